"""Command-line entry: parse options, run the trainer, turn input errors into one line + exit 2."""

from __future__ import annotations

import os
import re
import sys

from gram_scale.errors import (
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_TRAINING_STOPPED,
    InputError,
    Interrupted,
    TrainingStopped,
)

# What a failed collective says: a lost peer or a timeout, not a bug in this process.
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection|timed out|timeout|broken pipe|socket|peer", re.IGNORECASE
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _main_process() -> bool:
    # every rank stops alike; one of them speaks for the run
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/train.py`` and ``gram-train``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from gram_scale.config import parse_options

        opts = parse_options(argv)
        from gram_scale.trainer import train

        train(opts)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_STOPPED
    except Interrupted as exc:
        if _main_process() and not exc.said:
            print(str(exc), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, or a second one
        if _main_process():
            print("interrupted (SIGINT): stopped at once; checkpoints written so far stay usable",
                  file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    except RuntimeError as exc:  # a collective failed: a peer died or timed out
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        if not (isinstance(exc, dist.DistError) or _COLLECTIVE_FAILURE.search(str(exc))):
            raise  # a real failure of this process: its traceback is what helps
        rank = dist.get_rank()
        print(f"error: rank {rank}: lost another process of the run ({_first_line(exc)}); the "
              "latest checkpoint stays usable (--resume latest)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(EXIT_PEER_LOST)  # skip interpreter teardown: the process group is broken
    return 0
