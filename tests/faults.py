"""Fault injection for the resume and error tests: a trainer callback (``gram_scale.trainer``'s
``Callback``) read from ``GRAM_FAULT_KILL=RANK:WHEN[:WHAT][,RANK:WHEN[:WHAT]...]``.

Entry k makes that rank fail on elastic attempt k (the first entry on the first attempt, so a
restart does not hit the same fault again). WHEN is one of the trainer's events: ``N`` before
step N (0-based), ``during-N`` inside step N (after its computation), ``stage-N`` while staging
the best export after N steps, ``eval`` in the final evaluation, ``export`` while the export is
written. WHAT: a signal to send itself (default SIGKILL), ``RuntimeError`` (a bug) or ``OOM``."""

from __future__ import annotations

import os
import signal

import torch


def fault_callbacks() -> list:
    """The callbacks ``GRAM_FAULT_KILL`` asks for: none when it is unset."""
    entries = [e for e in os.environ.get("GRAM_FAULT_KILL", "").split(",") if e]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(entries):
        return []
    fault_rank, when, *what = entries[attempt].split(":")
    what = what[0] if what else "SIGKILL"

    def inject_fault(event: str, rank: int) -> None:
        if rank == int(fault_rank) and event == when:
            inject(what)

    return [inject_fault]


def inject(what: str) -> None:
    """Fail as ``what`` says: a signal to this process, a bug, or running out of memory."""
    if what == "RuntimeError":
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 64x32)")
    if what == "OOM":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    os.kill(os.getpid(), signal.Signals[what])
