"""GRAM Multi-step: the encoder is updated once per window from accumulated item gradients.

Inside a window, item vectors come from the item table (filled lazily by no-grad encoder passes
the first time an item is touched) and only the CF model steps; each touched row moves by plain
SGD, at ``--table-lr``, with the gradient the CF model sends it (of the batch-mean loss). At the
window end the encoder catches up as a small regression job, as the authors train it: the
window's touched items, shuffled by (seed, window, pass), are cut into mini-batches of
``--regress-batch-size`` (auto: touched items / window steps, so an N-step window makes about N
encoder steps, as many as E2E would); each mini-batch is re-encoded with gradient in chunks by
the chunk rule of every encode (accumulated, so memory is bounded by the chunk) and the encoder takes
one optimizer step on 0.5 / r x squared error to the targets, summed, a target being the cached
vector moved by r x its accumulated gradient (r: ``--target-lr``, by default ``--table-lr``, so
the targets are the rows): at the cached vectors its gradient is the accumulated CF gradient, so
a 1-step window equals Single-step at any rates. ``--encoder-epochs`` passes. The targets stay
fixed through the catch-up. After the update the CF model replays the window's last batches on
the new vectors (``--cf-refresh``). Under ``--last-window cf`` (the default) a run of two or
more windows ends with a window that trains the CF model only, on the previous update's
vectors: no update at its end, whose vectors the CF model would meet only in the refresh.

The table is sharded by item owner: each rank holds, fills, updates and regresses onto the rows
it owns; rows reach the ranks that read them, and gradients come back, through the step's item
exchange. The mini-batches are global: every rank gathers the window's touched ids and draws
the same shuffle, then encodes the items of each mini-batch it owns (padded to the same number
of calls on every rank), so the encoder's steps do not depend on the number of ranks.
"""

from __future__ import annotations

import torch

from gram_scale.accumulator import ItemTable
from gram_scale.data.batches import Batch, merge_batches, unique_index
from gram_scale.exchange import ItemExchange, owned, shard_rows
from gram_scale.schedule import run_steps
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


def window_steps(spec: tuple[str, float], steps_per_epoch: int) -> int:
    """Window length in steps from ``('steps', n)`` or ``('epochs', f)``."""
    kind, value = spec
    if kind == "steps":
        return int(value)
    return max(1, round(value * steps_per_epoch))


# --regress-lr sqrt and linear scale the encoder's rate at window ends by at most these
MAX_REGRESS_LR_SCALE = 2.0
MAX_LINEAR_LR_SCALE = 4.0
# --regress-lr auto: the linear rule when the first window's summed accumulated CF gradients
# are at least this share of its summed vector norms x sqrt(steps that touched each row)
AUTO_LINEAR_GRAD_RATIO = 0.006
# auto mini-batches hold at least this many items (all of them when a window touches fewer)
MIN_REGRESS_BATCH = 16


def regress_batch(touched: int, steps: int, size: int | None) -> int:
    """Items per window-end mini-batch: ``size``, or for auto (None) the window's touched items
    over its steps, rounded up (as many encoder steps as the window took CF steps), but at least
    ``MIN_REGRESS_BATCH``: a window that touches few items per step (a small catalogue, a long
    window) then makes fewer, fuller encoder steps instead of one optimizer step per item or
    two."""
    if size is not None:
        return size
    return max(1, min(touched, max(MIN_REGRESS_BATCH, -(-touched // max(1, steps)))))


def regress_batches(touched: int, steps: int, size: int | None) -> int:
    """Encoder optimizer steps of one regression pass over ``touched`` items (auto: at most
    ``steps``)."""
    return -(-touched // regress_batch(touched, steps, size))


def regress_order(items: torch.Tensor, seed: int, window: int, pass_: int) -> torch.Tensor:
    """The window's touched items (sorted, global) in the order of one regression pass: a
    shuffle drawn from (seed, window, pass) alone, the same on every rank and every resume."""
    # modulo torch's 64-bit seed range: a large --seed would overflow it (smaller ones unchanged)
    g = torch.Generator().manual_seed(((seed * 1_000_003 + window) * 65_537 + pass_) % 2**64)
    return items[torch.randperm(len(items), generator=g)]


def regress_lr_scale(rule: str, steps: int, updates: int) -> float:
    """The factor on the encoder's rate for a window-end regression of ``updates`` optimizer
    steps after a window of ``steps`` CF steps: each regression step carries the gradients of
    steps / updates CF steps, a batch that much larger. ``sqrt``: Adam's square-root rule,
    capped at 2x; ``linear``: the ratio, capped at 4x; ``same``: 1. (toeic-like's 63 items over
    431 steps make 4 mini-batches: uncapped, 108x linear and 10x square root, and at 10x the
    encoder collapsed.)"""
    ratio = max(1.0, steps / max(updates, 1))
    if rule == "sqrt":
        return min(MAX_REGRESS_LR_SCALE, ratio**0.5)
    if rule == "linear":
        return min(MAX_LINEAR_LR_SCALE, ratio)
    return 1.0


def auto_rate_rule(sum_touch_norms: float, sum_grad_norms: float) -> str:
    """``--regress-lr auto``'s choice at the first window end: ``linear`` when the touched rows'
    summed accumulated-gradient norms are at least ``AUTO_LINEAR_GRAD_RATIO`` x their summed
    |cached vector| x sqrt(steps that touched the row), else ``sqrt``.

    A row's gradient sums over the steps that touch it about as a random walk does (its size
    over the sum of its steps' sizes is near 1 / sqrt(touches)), so the ratio measures how hard
    one CF step pulls on an item against the item vector's size, whatever the window's length
    or the item's frequency. Measured on first windows of 1E, 0.5E and 10-step runs:
    kt-finetune 0.0008-0.0015, kt-often 0.0010-0.0018, kt-small 0.0016-0.0019, toeic-like
    0.0032-0.0034 (these keep the square root: the linear rate collapsed kt-often and cost
    toeic-like's 1E window 1.4 points), news-finetune 0.0085-0.0129 (on its selection seeds the
    linear rate kept 96% of the 1E gain in valid AUC, the square root 75%)."""
    return "linear" if sum_grad_norms >= AUTO_LINEAR_GRAD_RATIO * sum_touch_norms else "sqrt"


def cf_only_last(opts, windows: int) -> bool:
    """Whether a run of ``windows`` windows ends with a window that trains the CF model only
    (``--last-window cf``; a run of one window always updates the encoder)."""
    return opts.last_window == "cf" and windows > 1


def _items_of(batches: list[Batch]) -> torch.Tensor:
    """The catalogue rows of the batches (sorted, unique)."""
    found = [b.items[b.items >= 0] for b in batches]
    return torch.unique(torch.cat([torch.zeros(0, dtype=torch.long), *found]))


def window_encoder_steps(opts, steps_per_epoch: int, n_items: int, step_items: int) -> int:
    """Encoder optimizer steps of a Multi-step run: an estimate of the window-end
    mini-batches, ``--encoder-epochs`` times each.

    A window of w steps touches T items, known only once it has run: here T is taken as at
    most the catalogue (``n_items``) and at most w times one step's unique items
    (``step_items``, e.g. the first batch's). It makes ceil(T / batch) mini-batches: with auto
    at most min(w, ceil(T / 16)), so about the run's steps when a window's items outnumber its
    steps 16 to 1, and fewer when they do not (a long window over a small catalogue). The last
    partial window counts with the steps it takes, and under ``--last-window cf`` the run's
    last window (of two or more) counts none. A short estimate is harmless (later steps keep
    the last rate), a long one leaves the decay unfinished."""
    steps = run_steps(opts, steps_per_epoch)
    window = window_steps(opts.window_spec(), steps_per_epoch)
    size = opts.regress_batch()

    def batches(w: int) -> int:
        return regress_batches(min(n_items, w * step_items), w, size) if w else 0

    per_pass = (steps // window) * batches(window) + batches(steps % window)
    if cf_only_last(opts, -(-steps // window)):
        per_pass -= batches(steps % window or window)
    return per_pass * opts.encoder_epochs


class MultiStep:
    """CF steps on table rows; the encoder catches up at every window end."""

    name = "multi"
    updates = "Multi-step window ends"  # what its encoder steps are called (plots)

    @staticmethod
    def encoder_steps(opts, steps_per_epoch: int, task) -> int:
        """The window-end mini-batches of the run (``window_encoder_steps``), estimated from
        the first batch's unique items."""
        first = next(task.train_batches(0), None)
        step_items = 0 if first is None else len(torch.unique(first.items[first.items >= 0]))
        return window_encoder_steps(opts, steps_per_epoch, len(task.data.catalogue), step_items)

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm
        self.window = window_steps(opts.window_spec(), steps_per_epoch)
        self.encoder_epochs = opts.encoder_epochs
        self.regress_size = opts.regress_batch()
        self.seed = opts.seed
        self.table = ItemTable(
            runner.encoder.dim,
            lr=opts.table_lr,
            target_lr=opts.target_lr,
            dtype=runner.dtype,
            device=runner.device,
            optimizer=opts.table_optimizer,
        )
        self.target_distance = opts.target_distance
        self.weights = opts.regress_weights
        self.cf_refresh = opts.refresh_steps(self.window)
        self.refresh_merge = opts.cf_refresh_merge
        # the rate rule in force: auto's is chosen at the first window end (None until then)
        self.auto_rate = opts.regress_lr == "auto"
        self.rate_rule: str | None = None if self.auto_rate else opts.regress_lr
        self.lr_scale = 1.0
        self.window_stats: dict | None = None  # the last window end's figures, for the history
        self.windows_done = 0
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = run_steps(opts, steps_per_epoch)
        self.windows_total = -(-self.total_steps // self.window)
        self.cf_only_last = cf_only_last(opts, self.windows_total)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None  # the window's (items, vectors)
        self.cache_window: int | None = None
        self.encoder_skips = 0  # mini-batch updates dropped for a non-finite encoder gradient

    def updates_encoder(self, window: int) -> bool:
        """Whether ``window``'s end updates the encoder (a trainable one): every window's but,
        under ``--last-window cf``, the last of a run of two or more."""
        return not (self.cf_only_last and window == self.windows_total - 1)

    def window_batches(self, window: int) -> list[Batch]:
        """The global batches of a window: batches are fixed by (seed, epoch), so a window's
        batches are known at its start."""
        spe, start = self.steps_per_epoch, window * self.window
        stop = min(start + self.window, self.total_steps)
        found = []
        for epoch in range(start // spe, (stop - 1) // spe + 1):
            for i, batch in enumerate(self.cf.task.train_batches(epoch)):
                if start <= epoch * spe + i < stop:
                    found.append(batch)
        return found

    def window_items(self, window: int) -> torch.Tensor:
        """The catalogue rows of every global batch of a window (sorted, unique)."""
        return _items_of(self.window_batches(window))

    def refresh_cf(self, batches: list[Batch], extra: torch.Tensor, window: int) -> None:
        """CF-only steps on ``batches`` (global, merged ``--cf-refresh-merge`` at a time before
        each rank takes its slice) with the updated encoder's vectors, so the CF model meets the
        vectors it will be evaluated on: the next window's cache, filled now, and ``extra``
        (this rank's owned items of the batches that the next window does not hold), encoded
        here. Every rank calls it."""
        rank, world = self.comm.rank, self.comm.world
        if window + 1 < self.windows_total:
            self.prefill(window + 1)
            keys, vecs = self.cache
        else:
            keys, vecs = torch.zeros(0, dtype=torch.long), self.runner.empty()
        keys, order = torch.sort(torch.cat([keys, extra]))
        vecs = torch.cat([vecs, self.runner.vectors(extra, window + 1)])[order.to(vecs.device)]
        k = self.refresh_merge
        for batch in [merge_batches(batches[i : i + k]) for i in range(0, len(batches), k)]:
            mine = batch.slice(rank, world)
            local, index = unique_index(mine.items)
            ex = ItemExchange(self.comm, local)
            rows = ex.fetch(vecs[torch.searchsorted(keys, ex.served).to(vecs.device)])
            loss_sum, count, g = self.cf.loss_and_item_grads(mine, rows, index)
            totals, _ = self.cf.agree(loss_sum, count, g, Plan(0, 0, 0))
            if totals.ok:  # at the current rate: the schedule counts training steps only
                self.cf.step(schedule=False)
            else:
                self.cf.discard()

    def refresh_plan(self, window: int) -> tuple[list[Batch], torch.Tensor, int]:
        """What the CF refresh after this window's update replays: its batches, this rank's
        owned items of them that the next window's cache will not hold, and the rows encoded
        for it (the next window's, filled early, and those)."""
        if not self.cf_refresh or not self.runner.trainable:
            return [], torch.zeros(0, dtype=torch.long), 0
        batches = self.window_batches(window)[-self.cf_refresh :]
        mine = owned(self.comm, _items_of(batches))
        if window + 1 >= self.windows_total:
            return batches, mine, len(mine)
        following = owned(self.comm, self.window_items(window + 1))
        extra = mine[~torch.isin(mine, following)]
        return batches, extra, len(following) + len(extra)

    def prefill(self, window: int) -> int:
        """Encode (no gradient) the items of the window this rank owns, in chunks, into the
        window's cache; every rank makes the same number of calls. The rows encoded (a frozen
        encoder's: those its run's cache did not hold yet)."""
        f0 = self.runner.item_forwards
        mine = owned(self.comm, self.window_items(window))
        self.cache = (mine, self.runner.vectors(mine, window))
        self.cache_window = window
        return self.runner.item_forwards - f0

    def cached(self, items: torch.Tensor) -> torch.Tensor:
        """The window's cached vectors of ``items`` (sorted cache, every item present)."""
        keys, vecs = self.cache
        pos = torch.searchsorted(keys, items).clamp(max=max(len(keys) - 1, 0))
        if len(items) and not bool((keys[pos] == items).all()):
            raise RuntimeError("an item of the window is missing from its prefilled cache")
        return vecs[pos.to(vecs.device)]

    def step(self, batch: Batch, step: int) -> StepResult:
        """One CF step; at a window boundary also the encoder update."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        window = step // self.window
        local, index = unique_index(batch.items)
        ex = ItemExchange(self.comm, local)
        held = len(self.table)
        filled = self.prefill(window) if self.cache_window != window else 0
        missing = self.table.missing(ex.served)
        self.table.insert(missing, self.cached(missing))
        loss_sum, count, g = self.cf.loss_and_item_grads(
            batch, ex.fetch(self.table.rows(ex.served)), index
        )
        updated = (step + 1) % self.window == 0
        update = updated and self.updates_encoder(window)
        regress = self.encoder_epochs if update and self.runner.trainable else 0
        replay, extra, refilled = self.refresh_plan(window) if update else ([], None, 0)
        filled += refilled
        plan = Plan(
            filled + regress * len(self.table),
            regress * len(self.table),
            filled + regress * held,
            regress * held,
            ex.grad_traffic(),
        )
        totals, g = self.cf.agree(loss_sum, count, g, plan)
        if not totals.ok:  # CF optimizer and table untouched; the window schedule goes on
            self.cf.discard()
            self.table.truncate(held)
        else:
            self.table.apply(ex.served, ex.return_grads(g))
            self.cf.step()
        skips = self.encoder_skips
        self.window_stats = None
        if updated:
            self.end_window(window, self.window)
            if replay:
                self.refresh_cf(replay, extra, window)
        check_counts(self.runner, plan, totals, f0, b0)
        return StepResult(
            loss=totals.loss,
            occurrences=batch.occurrences(),
            unique=len(local),
            item_forwards=self.runner.item_forwards - f0,
            item_backwards=self.runner.item_backwards - b0,
            encoder_updated=update and self.runner.trainable and self.encoder_skips == skips,
            skipped=not totals.ok,
            encoder_skipped=self.encoder_skips > skips,
            totals=totals,
            window_stats=self.window_stats,
        )

    def end_window(self, window: int, steps: int) -> None:
        """Regress the encoder onto the window's touched rows (``steps``: the window's length,
        for the auto mini-batch size; no regression for a frozen encoder or the run's CF-only
        last window), then clear the table; every rank calls it."""
        if self.runner.trainable and self.updates_encoder(window):
            # Sorted: the gathered order follows the ranks, the shuffle must not. (These ids, 8
            # bytes a touched item once a window, are not in the item-traffic counters.)
            touched = torch.sort(self.comm.gather_rows(self.table.items())).values
            size = regress_batch(len(touched), steps, self.regress_size)
            sum_base, sum_grad, sum_touch = self.comm.sum_floats(list(self.table.norms()))
            if self.rate_rule is None:  # auto, at the first window end
                self.rate_rule = auto_rate_rule(sum_touch, sum_grad)
            updates = -(-len(touched) // size) * self.encoder_epochs
            self.lr_scale = regress_lr_scale(self.rate_rule, steps, updates)
            if self.target_distance > 0 and sum_grad > 0:
                self.table.target_lr = self.target_distance * sum_base / sum_grad
            self.max_steps = self.comm.max_int(
                int(self.table.steps[: len(self.table)].max()) if len(self.table) else 0
            )
            self.window_stats = {
                "window_items": len(touched),
                "regress_batch": size,
                "target_lr": self.table.target_lr,
                "lr_scale": self.lr_scale,
                "rate_rule": self.rate_rule,
                "mean_vector_norm": sum_base / max(len(touched), 1),
                "mean_grad_norm": sum_grad / max(len(touched), 1),
                "grad_per_touch": sum_grad / sum_touch if sum_touch > 0 else 0.0,
            }
            self.moved = 0.0
            for pass_ in range(self.encoder_epochs):
                order = regress_order(touched, self.seed, window, pass_)
                for start in range(0, len(order), size):
                    self.regress(owned(self.comm, order[start : start + size]), window)
            # how far the encoder had moved each item's vector when the regression reached it
            moved = self.comm.sum_floats([self.moved])[0]
            self.window_stats["encoder_move"] = moved / max(len(touched) * self.encoder_epochs, 1)
        self.table.clear()
        self.windows_done += 1

    def regress(self, items: torch.Tensor, window: int) -> None:
        """One encoder optimizer step on one mini-batch: this rank's ``items`` (owned, held)
        encoded and back-propagated in chunks, padded to the same number of calls on every
        rank (ZeRO-3 gathers parameters collectively inside each call)."""
        calls = self.runner.calls(items)
        for c, piece in enumerate(calls):
            h = self.runner.encode(piece.items, salt=window, grad=True, count=piece.real)
            real = piece.items[: piece.real]
            w = None
            if self.weights == "sqrt-count":
                w = (self.table.step_counts(real).double() / self.max_steps).sqrt()
            g = self.table.regression_grad(real, h[: piece.real], w)
            base, _ = self.table.base_and_grads(real)
            self.moved += float((h[: piece.real].detach() - base).norm(dim=1).sum())
            self.runner.backward(
                h, piece.pad(g), last=c == len(calls) - 1, count=piece.real, items=piece.items
            )
        if not self.runner.step(self.lr_scale):  # non-finite gradient: this update is dropped
            self.encoder_skips += 1

    def finish(self, step: int) -> StepResult | None:
        """Close a partly filled last window so its gradients reach the encoder, then refresh
        the CF model on the updated vectors (its last batches, at most ``--cf-refresh``)."""
        if self.comm.sum_int(len(self.table)) == 0:
            return None
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        # Auto mini-batches from the steps this window really took: a short last window then
        # makes about as many encoder steps as it took CF steps, with mini-batches the size of
        # the full windows' (its configured length would cut its few items into as many
        # mini-batches as a full window has).
        window = step // self.window
        self.end_window(window, step % self.window or self.window)
        if not self.updates_encoder(window):  # the run's last window trains the CF model only
            return None
        # and the CF model meets the updated vectors, as after a full window: without the
        # refresh the final model pairs a CF model trained on the old vectors with new ones
        replay, extra, _ = self.refresh_plan(window)
        if replay:
            self.refresh_cf(replay, extra, window)
        return StepResult(
            0.0, 0, 0, self.runner.item_forwards - f0, self.runner.item_backwards - b0, True
        )

    def state_dict(self) -> dict:
        """The whole item table (every rank's rows, gathered: checkpoints are written by the
        main process) and the window count; every rank calls it."""
        mine = self.table.state_dict()
        keys, vecs = self.cache if self.cache is not None else (torch.zeros(0).long(), None)
        vecs = vecs if vecs is not None else torch.zeros(0, self.runner.encoder.dim)
        return {
            "table": {k: self.comm.gather_rows(v) for k, v in mine.items()},
            "windows_done": self.windows_done,
            "rate_rule": self.rate_rule or "",
            "cache": {
                "window": -1 if self.cache_window is None else self.cache_window,
                "items": self.comm.gather_rows(keys),
                "vectors": self.comm.gather_rows(vecs.cpu()),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's rows of a checkpoint's table, and the window count."""
        table = state["table"]
        keep = shard_rows(self.comm, table["items"])
        self.table.load_state_dict({k: v[keep] for k, v in table.items()})
        self.windows_done = state["windows_done"]
        if self.auto_rate:
            # a checkpoint from before auto existed had the square-root rule at its window ends
            saved = state.get("rate_rule", "sqrt" if self.windows_done else "")
            self.rate_rule = saved or None
        cache = state.get("cache")
        if cache is not None and cache["window"] >= 0:
            items = cache["items"]
            keep = shard_rows(self.comm, items)
            order = torch.argsort(items[keep])
            vecs = cache["vectors"][keep][order].to(self.runner.device, self.runner.dtype)
            self.cache, self.cache_window = (items[keep][order], vecs), cache["window"]
