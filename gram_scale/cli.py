"""Command-line entry: parse options, run the trainer, turn input errors into one line + exit 2."""

from __future__ import annotations

import os
import sys

from gram_scale.errors import EXIT_INPUT_ERROR, InputError


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/train.py`` and ``gram-train``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gram_scale.config import parse_options

    try:
        opts = parse_options(argv)
        from gram_scale.trainer import train

        train(opts)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    return 0
