"""Command-line entry: parse options, run the trainer, turn input errors into one line + exit 2."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from gram_scale.errors import (
    EXIT_FAILED,
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


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """Entry point of ``launch/train.py`` and ``gram-train``; ``callbacks``: the trainer's
    (``gram_scale.trainer.Callback``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = None
    try:
        from gram_scale.config import parse_options

        opts = parse_options(argv)
        from gram_scale.trainer import train

        train(opts, callbacks)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_STOPPED
    except Interrupted as exc:
        if _main_process() and not exc.said:
            print(str(exc), file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, or a second one
        if _main_process():
            print(
                "interrupted (SIGINT): stopped at once; checkpoints written so far stay usable",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_INTERRUPTED
    except Exception as exc:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else int(os.environ.get("RANK", "0"))
        if distributed and _collective_failed(exc):  # a peer died or timed out
            print(
                f"error: rank {rank}: lost another process of the run ({_first_line(exc)}); "
                "the latest checkpoint stays usable (--resume latest)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_PEER_LOST)  # skip interpreter teardown: the process group is broken
        print(
            f"error: rank {rank}: {_describe(exc)} ({_save_traceback(exc, opts, rank)})",
            file=sys.stderr,
            flush=True,
        )
        if distributed:  # the peers wait in a collective: end now so the launcher stops them
            os._exit(EXIT_FAILED)
        return EXIT_FAILED
    return 0


def _collective_failed(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


def _describe(exc: BaseException) -> str:
    """What failed, in one line; out of memory with what lowers it."""
    import torch

    text = f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc):
        text += (
            "; out of memory: lower --encoder-tokens (padded tokens of encoder graph kept at "
            "once) or --encoder-batch-size (items per encoder pass), or add "
            "--gradient-checkpointing"
        )
    return text


def _save_traceback(exc: BaseException, opts, rank: int) -> str:
    """Write the full traceback to OUTPUT/error-rank<N>.log; where it went, in words."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    if opts is not None:
        try:
            path = Path(opts.output_dir) / f"error-rank{rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return f"full traceback in {path}"
        except OSError:
            pass
    print(text, file=sys.stderr, end="", flush=True)  # nowhere to write it: show it
    return "traceback above"
