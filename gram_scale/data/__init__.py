"""Files -> item catalogue and interaction sequences -> token cache -> batches."""
