"""Stop requests: a signal asks the run to stop at the next step boundary instead of killing it
mid-step.

While ``StopRequest`` is active (from the first step to the end of the export), the first of
its signals only sets ``received``; the trainer checks it after each step, after each epoch's
evaluation, before and after the final evaluation and after the export, every rank at the same
point through one small all-reduce (so none waits in a collective for a rank that left), writes
a checkpoint when checkpoints are on (after the export: none is needed), and raises
``Interrupted``. A second
signal is handled as the signal's default (Ctrl-C: ``KeyboardInterrupt``) so that a user who
does not want to wait can still stop the run at once. A repeat within ``grace_s`` of the first
is ignored: ``accelerate launch`` forwards the Ctrl-C that the terminal already delivered to
every rank. The trainer listens to SIGINT always, and to SIGTERM and SIGUSR1 with
``--save-on-signal`` (the default); the run then exits with 128 + the signal's number.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

# Every signal a run can be asked to stop by, in the order ranks report them to each other
# (SIGINT: Ctrl-C; SIGTERM: a preemption or scancel; SIGUSR1: Slurm's warning before a limit).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def agreed_signal(counts: list[int]) -> int | None:
    """The signal the whole run stops for, from the per-signal counts summed over ranks (one
    entry per ``STOP_SIGNALS``): a preemption before a time-limit warning before a Ctrl-C."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        if counts[STOP_SIGNALS.index(sig)]:
            return int(sig)
    return None


def stop_counts(total: int, world: int) -> list[int]:
    """Per-signal rank counts (one per ``STOP_SIGNALS``) from the sum over ranks of
    ``StopRequest.code``: base world + 1 digits, so no count carries into the next."""
    base = world + 1
    return [(total // base**k) % base for k in range(len(STOP_SIGNALS))]


class StopRequest:
    """Turns the given signals into a flag while active (a context manager)."""

    def __init__(self, signums: tuple[int, ...] = (signal.SIGINT,), grace_s: float = 2.0):
        self.signums = tuple(signums)
        self.grace_s = grace_s
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def code(self, world: int) -> int:
        """This rank's stop signal as one integer whose sum over ``world`` ranks still tells
        how many ranks received each signal (``stop_counts``); 0 for none."""
        if self.received is None:
            return 0
        return (world + 1) ** STOP_SIGNALS.index(self.received)

    @property
    def name(self) -> str:
        """The received signal's name (``SIGINT``), or empty."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            return
        if time.monotonic() - self._at < self.grace_s:
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL / SIG_IGN: act as if we had never been installed
            signal.signal(signum, previous)
            signal.raise_signal(signum)

    def __enter__(self) -> StopRequest:
        for s in self.signums:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
