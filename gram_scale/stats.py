"""What GRAM will buy on a data set, before training: ``python -m gram_scale.stats ...``.

R_batch (paper Eq. 10) = item occurrences / unique items, summed over the epoch's batches: the
encoder work Single-step saves. R_epoch (Eq. 11) = occurrences in an epoch / distinct items
of the epoch: the saving of Multi-step with a one-epoch window.

``--world N`` adds the item traffic per rank per step on N processes, predicted from the data's
own batches: the sharded exchange (each rank's unique items that another rank owns travel as an
id, a row and a gradient) next to all-gathering the step's union and all-reducing its gradient.
"""

from __future__ import annotations

import json
import sys

import torch

from gram_scale.config import parse_options
from gram_scale.errors import EXIT_INPUT_ERROR, InputError
from gram_scale.exchange import ID_BYTES, owner_of

_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp64": 8}


def batch_stats(task) -> dict:
    """Occurrence and uniqueness counts of the first epoch's training batches."""
    occ, uniq, seen, n_batches = 0, 0, set(), 0
    for batch in task.train_batches(0):
        items = batch.items[batch.items >= 0]
        u = torch.unique(items)
        occ += len(items)
        uniq += len(u)
        seen.update(u.tolist())
        n_batches += 1
    return {
        "batches": n_batches,
        "occurrences": occ,
        "distinct_items": len(seen),
        "occurrences_per_batch": occ / max(n_batches, 1),
        "unique_per_batch": uniq / max(n_batches, 1),
        "R_batch": occ / max(uniq, 1),
        "R_epoch": occ / max(len(seen), 1),
    }


def rank_pairs(batch, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, item) of every item that some rank's slice of ``batch`` holds, once per rank."""
    n = len(batch)
    starts = torch.tensor([r * n // world for r in range(1, world + 1)])
    rank_of_row = torch.searchsorted(starts, torch.arange(n), right=True)
    ranks = rank_of_row.view(-1, *([1] * (batch.items.dim() - 1))).expand_as(batch.items)
    valid = batch.items >= 0
    width = int(batch.items.max()) + 1 if valid.any() else 1
    keys = torch.unique(ranks[valid] * width + batch.items[valid])
    return keys // width, keys % width


def exchange_rows(batch, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rank: rows it asks other ranks for, and rows it serves to other ranks, in a step."""
    ranks, items = rank_pairs(batch, world)
    owners = owner_of(items, world)
    remote = ranks != owners
    asked = torch.bincount(ranks[remote], minlength=world)
    served = torch.bincount(owners[remote], minlength=world)
    return asked, served


def traffic(task, world: int, dim: int, element_bytes: int) -> dict:
    """Predicted item bytes (sent + received) per rank per step over the first epoch."""
    row = dim * element_bytes
    per_pair = ID_BYTES + 2 * row  # an id to the owner, a row back, a gradient to the owner
    steps, total, worst, union_bytes = 0, 0.0, 0.0, 0.0
    for batch in task.train_batches(0):
        asked, served = exchange_rows(batch, world)
        per_rank = (asked + served).double() * per_pair
        total += float(per_rank.mean())
        worst = max(worst, float(per_rank.max()))
        u = len(torch.unique(batch.items[batch.items >= 0]))
        union_bytes += 3.0 * u * row  # all-gather U x D, all-reduce U x D (sent and received)
        steps += 1
    steps = max(steps, 1)
    return {
        "world": world,
        "exchange_bytes_per_rank_step": total / steps,
        "exchange_max_bytes_rank_step": worst,
        "allgather_bytes_per_rank_step": union_bytes / steps,
    }


def compute(opts) -> dict:
    """Statistics of the training split as the trainer would batch it."""
    from gram_scale.data.load import load_data
    from gram_scale.tasks import make_task

    data = load_data(opts)
    task = make_task(opts, data, dim=8 * opts.cf_heads)  # the CF model is not used here
    out = {"task": opts.task, "items": len(data.catalogue), "batch_size": opts.batch_size}
    out.update(task.size_stats(data))
    out["cold_items"] = int(data.cold_items.sum())
    out.update(batch_stats(task))
    return out


def _take(argv: list[str], flag: str, default: str | None) -> str | None:
    if flag not in argv:
        return default
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise InputError(flag, None, "needs a value")
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def _positive(flag: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InputError(flag, None, f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Print the statistics (``--json`` for machine-readable output; ``--world N[,N...]`` and
    ``--dim D`` for the predicted item traffic per rank per step)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    if as_json:
        argv.remove("--json")
    try:
        worlds = _take(argv, "--world", None)
        dim = _positive("--dim", _take(argv, "--dim", "1024"))
        worlds = [_positive("--world", w) for w in worlds.split(",")] if worlds else []
        opts = parse_options(argv, prog="python -m gram_scale.stats")
        stats = compute(opts)
        if worlds:
            from gram_scale.data.load import load_data
            from gram_scale.tasks import make_task

            task = make_task(opts, load_data(opts), dim=8 * opts.cf_heads)
            element = _ELEMENT_BYTES[opts.precision]
            stats["traffic"] = [traffic(task, w, dim, element) for w in worlds]
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    rows = stats.pop("traffic", [])
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if rows:
        print(f"\nitem traffic per rank per step (D = {dim}, {opts.precision}):")
        print(
            f"{'world':>6}  {'exchange mean':>14}  {'exchange max':>13}  {'all-gather union':>17}  {'ratio':>6}"
        )
        for r in rows:
            mean, worst = r["exchange_bytes_per_rank_step"], r["exchange_max_bytes_rank_step"]
            union = r["allgather_bytes_per_rank_step"]
            print(
                f"{r['world']:>6}  {_size(mean):>14}  {_size(worst):>13}  {_size(union):>17}  "
                f"{union / max(mean, 1):>6.1f}"
            )
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


if __name__ == "__main__":
    sys.exit(main())
