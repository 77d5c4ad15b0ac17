"""Command-line entry: parse options, run the trainer, turn input errors into one line + exit 2."""

from __future__ import annotations

import os
import sys

from gram_scale.errors import (
    EXIT_INPUT_ERROR,
    EXIT_PEER_LOST,
    EXIT_TRAINING_STOPPED,
    InputError,
    TrainingStopped,
)


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
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_STOPPED
    except RuntimeError as exc:  # a collective failed: a peer died or timed out
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        rank = dist.get_rank()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: rank {rank}: lost another process of the run ({first}); the latest "
              "checkpoint stays usable (--resume latest)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(EXIT_PEER_LOST)  # skip interpreter teardown: the process group is broken
    return 0
