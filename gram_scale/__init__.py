"""gram-scale: fast end-to-end fine-tuning of text encoders for content-based collaborative filtering."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_run pulls in torch and transformers: only when asked, so `import gram_scale` stays light
    if name in ("load_run", "Run"):
        from gram_scale import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'gram_scale' has no attribute {name!r}")
