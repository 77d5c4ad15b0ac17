"""gram-scale: fast end-to-end fine-tuning of text encoders for content-based collaborative filtering."""

__version__ = "0.1.0"
