"""GRAM Multi-step: the encoder is updated once per window from accumulated item gradients.

Inside a window, item vectors come from the item table (filled lazily by no-grad encoder passes
the first time an item is touched) and only the CF model steps; each touched row moves by plain
SGD, at ``--table-lr``, with the gradient the CF model sends it (of the batch-mean loss). At the
window end the encoder catches up as a small regression job, as the authors train it: the
window's touched items, shuffled by (seed, window, pass), are cut into mini-batches of
``--regress-batch-size`` (auto: touched items / window steps, so an N-step window makes about N
encoder steps, as many as E2E would); each mini-batch is re-encoded with gradient in chunks of
``--encoder-batch-size`` (accumulated, so memory is bounded by the chunk) and the encoder takes
one optimizer step on 0.5 / r x squared error to the targets, summed, a target being the cached
vector moved by r x its accumulated gradient (r: ``--target-lr``, by default ``--table-lr``, so
the targets are the rows): at the cached vectors its gradient is the accumulated CF gradient, so
a 1-step window equals Single-step at any rates. ``--encoder-epochs`` passes. The targets stay
fixed through the catch-up.

The table is sharded by item owner: each rank holds, fills, updates and regresses onto the rows
it owns; rows reach the ranks that read them, and gradients come back, through the step's item
exchange. The mini-batches are global: every rank gathers the window's touched ids and draws
the same shuffle, then encodes the items of each mini-batch it owns (padded to the same number
of calls on every rank), so the encoder's steps do not depend on the number of ranks.
"""

from __future__ import annotations

import torch

from gram_scale.accumulator import ItemTable
from gram_scale.data.batches import Batch, unique_index
from gram_scale.exchange import ItemExchange, owned, pieces, shard_rows
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


def window_steps(spec: tuple[str, float], steps_per_epoch: int) -> int:
    """Window length in steps from ``('steps', n)`` or ``('epochs', f)``."""
    kind, value = spec
    if kind == "steps":
        return int(value)
    return max(1, round(value * steps_per_epoch))


def regress_batch(touched: int, steps: int, size: int | None) -> int:
    """Items per window-end mini-batch: ``size``, or for auto (None) the window's touched items
    over its steps, rounded up, at least 1."""
    if size is not None:
        return size
    return max(1, -(-touched // max(1, steps)))


def regress_batches(touched: int, steps: int, size: int | None) -> int:
    """Encoder optimizer steps of one regression pass over ``touched`` items (auto: at most
    ``steps``)."""
    return -(-touched // regress_batch(touched, steps, size))


def regress_order(items: torch.Tensor, seed: int, window: int, pass_: int) -> torch.Tensor:
    """The window's touched items (sorted, global) in the order of one regression pass: a
    shuffle drawn from (seed, window, pass) alone, the same on every rank and every resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + window) * 65_537 + pass_)
    return items[torch.randperm(len(items), generator=g)]


class MultiStep:
    """CF steps on table rows; the encoder catches up at every window end."""

    name = "multi"

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm
        self.window = window_steps(opts.window_spec(), steps_per_epoch)
        self.encoder_epochs = opts.encoder_epochs
        self.regress_size = opts.regress_batch()
        self.seed = opts.seed
        self.chunk = opts.encoder_batch_size
        self.table = ItemTable(
            runner.encoder.dim,
            lr=opts.table_lr,
            target_lr=opts.target_lr,
            dtype=runner.dtype,
            device=runner.device,
        )
        self.windows_done = 0
        self.encoder_skips = 0  # mini-batch updates dropped for a non-finite encoder gradient

    def step(self, batch: Batch, step: int, stop: int = 0) -> StepResult:
        """One CF step; at a window boundary also the encoder update."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        window = step // self.window
        local, index = unique_index(batch.items)
        ex = ItemExchange(self.comm, local)
        held = len(self.table)
        missing = self.table.missing(ex.served)
        # Most steps of a long window touch no new item; their padding call (a dummy row) is
        # made only where ZeRO-3 needs every rank in every call.
        for piece in pieces(self.comm, missing) if len(missing) or self.runner.lockstep else []:
            h = self.runner.encode(piece.items, salt=window, grad=False, count=piece.real)
            self.table.insert(piece.items[: piece.real], h[: piece.real])
        loss_sum, count, g = self.cf.loss_and_item_grads(
            batch, ex.fetch(self.table.rows(ex.served)), index
        )
        updated = (step + 1) % self.window == 0
        regress = self.encoder_epochs if updated and self.runner.trainable else 0
        new = len(self.table) - held
        plan = Plan(new + regress * len(self.table), regress * len(self.table),
                    new + regress * held, regress * held, ex.grad_traffic())  # fmt: skip
        totals, g = self.cf.agree(loss_sum, count, g, plan, stop)
        if not totals.ok:  # CF optimizer and table untouched; the window schedule goes on
            self.cf.discard()
            self.table.truncate(held)
        else:
            self.table.apply(ex.served, ex.return_grads(g))
            self.cf.step()
        skips = self.encoder_skips
        if updated:
            self.end_window(window, self.window)
        check_counts(self.runner, plan, totals, f0, b0)
        return StepResult(
            loss=totals.loss,
            occurrences=batch.occurrences(),
            unique=len(local),
            item_forwards=self.runner.item_forwards - f0,
            item_backwards=self.runner.item_backwards - b0,
            encoder_updated=updated and self.runner.trainable and self.encoder_skips == skips,
            skipped=not totals.ok,
            encoder_skipped=self.encoder_skips > skips,
            totals=totals,
        )

    def end_window(self, window: int, steps: int) -> None:
        """Regress the encoder onto the window's touched rows (``steps``: the window's length,
        for the auto mini-batch size), then clear the table; every rank calls it."""
        if self.runner.trainable:
            # Sorted: the gathered order follows the ranks, the shuffle must not. (These ids, 8
            # bytes a touched item once a window, are not in the item-traffic counters.)
            touched = torch.sort(self.comm.gather_rows(self.table.items())).values
            size = regress_batch(len(touched), steps, self.regress_size)
            for pass_ in range(self.encoder_epochs):
                order = regress_order(touched, self.seed, window, pass_)
                for start in range(0, len(order), size):
                    self.regress(owned(self.comm, order[start : start + size]), window)
        self.table.clear()
        self.windows_done += 1

    def regress(self, items: torch.Tensor, window: int) -> None:
        """One encoder optimizer step on one mini-batch: this rank's ``items`` (owned, held)
        encoded and back-propagated in chunks, padded to the same number of calls on every
        rank (ZeRO-3 gathers parameters collectively inside each call)."""
        calls = pieces(self.comm, items, self.chunk)
        for c, piece in enumerate(calls):
            h = self.runner.encode(piece.items, salt=window, grad=True, count=piece.real)
            g = self.table.regression_grad(piece.items[: piece.real], h[: piece.real])
            self.runner.backward(h, piece.pad(g), last=c == len(calls) - 1, count=piece.real)
        if not self.runner.step():  # non-finite encoder gradient: this update is dropped
            self.encoder_skips += 1

    def finish(self, step: int) -> StepResult | None:
        """Close a partly filled last window so its gradients reach the encoder."""
        if self.comm.sum_int(len(self.table)) == 0:
            return None
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        # Auto mini-batches from the steps this window really took: a short last window then
        # makes about as many encoder steps as it took CF steps, with mini-batches the size of
        # the full windows' (its configured length would cut its few items into as many
        # mini-batches as a full window has).
        self.end_window(step // self.window, step % self.window or self.window)
        return StepResult(
            0.0, 0, 0, self.runner.item_forwards - f0, self.runner.item_backwards - b0, True
        )

    def state_dict(self) -> dict:
        """The whole item table (every rank's rows, gathered: checkpoints are written by the
        main process) and the window count; every rank calls it."""
        mine = self.table.state_dict()
        return {
            "table": {k: self.comm.gather_rows(v) for k, v in mine.items()},
            "windows_done": self.windows_done,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's rows of a checkpoint's table, and the window count."""
        table = state["table"]
        keep = shard_rows(self.comm, table["items"])
        self.table.load_state_dict({k: v[keep] for k, v in table.items()})
        self.windows_done = state["windows_done"]
