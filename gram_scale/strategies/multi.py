"""GRAM Multi-step: the encoder is updated once per window from accumulated item gradients.

Inside a window, item vectors come from the item table (filled lazily by no-grad encoder passes
the first time an item is touched) and only the CF model steps; each touched row moves by plain
SGD with the gradient the CF model sends it. At the window end every touched item is re-encoded
with gradient in chunks of ``--encoder-batch-size`` and the encoder regresses onto the rows
(0.5 * squared error, summed), one optimizer step per ``--encoder-epochs`` pass.
"""

from __future__ import annotations

import math

import torch

from gram_scale.accumulator import ItemTable
from gram_scale.data.batches import Batch, unique_index
from gram_scale.distributed import owner_slices
from gram_scale.strategies.base import CFUpdate, StepResult, local_to_global_index


def window_steps(spec: tuple[str, float], steps_per_epoch: int) -> int:
    """Window length in steps from ``('steps', n)`` or ``('epochs', f)``."""
    kind, value = spec
    if kind == "steps":
        return int(value)
    return max(1, round(value * steps_per_epoch))


class MultiStep:
    """CF steps on table rows; the encoder catches up at every window end."""

    name = "multi"

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm
        self.window = window_steps(opts.window_spec(), steps_per_epoch)
        self.encoder_epochs = opts.encoder_epochs
        self.chunk = opts.encoder_batch_size
        self.table = ItemTable(runner.encoder.dim, lr=opts.table_lr, dtype=runner.dtype)
        self.windows_done = 0
        self.encoder_skips = 0  # window-end updates dropped for a non-finite encoder gradient

    def _mine(self, items: torch.Tensor) -> torch.Tensor:
        return items[owner_slices(len(items), self.comm.world)[self.comm.rank]]

    def step(self, batch: Batch, step: int) -> StepResult:
        """One CF step; at a window boundary also the encoder update."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        window = step // self.window
        local, index = unique_index(batch.items)
        union = self.comm.union(local)
        held = len(self.table)
        new = self.table.missing(union)  # same on every rank: the tables are replicas
        if len(new):
            mine = self._mine(new)
            h = self.runner.encode(mine if len(mine) else new[:1], salt=window, grad=False)
            self.table.insert(new, self.comm.gather_rows(h[: len(mine)]))
        rows = self.table.rows(union, self.runner.device)
        loss, g = self.cf.loss_and_item_grads(
            batch, rows, local_to_global_index(local, index, union)
        )
        skipped = not self.cf.all_finite(loss, g)
        if skipped:  # CF optimizer and table untouched; the window schedule goes on
            self.cf.discard()
            self.table.truncate(held)
        else:
            self.comm.all_reduce_([g])
            self.table.apply(union, g)
            self.cf.step()
        updated = (step + 1) % self.window == 0
        skips = self.encoder_skips
        if updated:
            self.end_window(window)
        return StepResult(
            loss=loss,
            occurrences=self.comm.sum_int(batch.occurrences()),
            unique=len(union),
            item_forwards=self.runner.item_forwards - f0,
            item_backwards=self.runner.item_backwards - b0,
            encoder_updated=updated and self.runner.trainable and self.encoder_skips == skips,
            skipped=skipped,
            encoder_skipped=self.encoder_skips > skips,
        )

    def end_window(self, window: int) -> None:
        """Regress the encoder onto the touched rows, then clear the table."""
        items = self.table.items()
        mine = items[owner_slices(len(items), self.comm.world)[self.comm.rank]]
        n_chunks = self.comm.max_int(math.ceil(len(mine) / self.chunk))
        for _ in range(self.encoder_epochs if self.runner.trainable else 0):
            for c in range(n_chunks):
                chunk = mine[c * self.chunk : (c + 1) * self.chunk]
                last = c == n_chunks - 1
                if len(chunk) == 0:  # padding call: same number of calls on every rank
                    h = self.runner.encode(items[:1], salt=window, grad=True)
                    self.runner.backward(h, torch.zeros_like(h), last=last, count=0)
                    continue
                h = self.runner.encode(chunk, salt=window, grad=True)
                self.runner.backward(h, self.table.regression_grad(chunk, h), last=last)
            if not self.runner.step():  # non-finite encoder gradient: that update is dropped
                self.encoder_skips += 1
        self.table.clear()
        self.windows_done += 1

    def finish(self, step: int) -> StepResult | None:
        """Close a partly filled last window so its gradients reach the encoder."""
        if len(self.table) == 0:
            return None
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        self.end_window(step // self.window)
        return StepResult(
            0.0, 0, 0, self.runner.item_forwards - f0, self.runner.item_backwards - b0, True
        )

    def state_dict(self) -> dict:
        """The item table (the window's touched rows) and the window count."""
        return {"table": self.table.state_dict(), "windows_done": self.windows_done}

    def load_state_dict(self, state: dict) -> None:
        """Restore the table and window count of a checkpoint."""
        self.table.load_state_dict(state["table"])
        self.windows_done = state["windows_done"]
