"""What GRAM will buy on a data set, before training: ``python -m gram_scale.stats ...``.

R_batch (paper Eq. 10) = item occurrences / unique items, summed over the epoch's batches: the
encoder work Single-step saves. R_epoch (Eq. 11) = occurrences in an epoch / distinct items
of the epoch: the saving of Multi-step with a one-epoch window.
"""

from __future__ import annotations

import json
import sys

import torch

from gram_scale.config import parse_options
from gram_scale.errors import EXIT_INPUT_ERROR, InputError


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


def compute(opts) -> dict:
    """Statistics of the training split as the trainer would batch it."""
    from gram_scale.data.load import load_data
    from gram_scale.tasks import make_task

    data = load_data(opts)
    task = make_task(opts, data, dim=8 * opts.cf_heads)  # the CF model is not used here
    out = {"task": opts.task, "items": len(data.catalogue), "batch_size": opts.batch_size}
    if opts.task == "kt":
        out["interactions"] = int(sum(len(items) for items, _ in data.train))
    else:
        out["impressions"] = len(data.train)
    out["cold_items"] = int(data.cold_items.sum())
    out.update(batch_stats(task))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the statistics (``--json`` for machine-readable output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    if as_json:
        argv.remove("--json")
    try:
        opts = parse_options(argv, prog="python -m gram_scale.stats")
        stats = compute(opts)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    if as_json:
        print(json.dumps(stats, indent=2))
    else:
        width = max(len(k) for k in stats)
        for k, v in stats.items():
            print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
