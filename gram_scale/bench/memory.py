"""Single-step encoder memory: what one step keeps for its backward, by chunk size and with and
without gradient checkpointing, on a workload whose CF batch holds many more unique items than a
chunk.

``python -m gram_scale.bench.memory`` trains a few Single-step steps in this process for each
setting and prints a table: unique items per step, the encoder activations kept for a backward
(the tensors autograd keeps alive for it, each storage once and no parameter, counted by a
saved-tensor hook: the same figure on every device), the
CUDA peak where there is a GPU, and the seconds per step. The first row encodes every item of
the step in one chunk, as E2E-style training must; the others are bounded by the chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from gram_scale.config import Options, validate
from gram_scale.errors import EXIT_INPUT_ERROR, InputError

MiB = 1024 * 1024
ONE_CHUNK = 1 << 20  # --encoder-batch-size larger than any step: the whole step in one call

# Knowledge tracing with all-MiniLM-L6-v2 and a wide CF batch (32 sequences x 50 steps over a
# 600-item catalogue): a step holds about 600 unique items, many times a chunk.
DATA = dict(n_users=300, n_items=600, mean_len=60, n_unused_items=0, seed=3)
OPTIONS = dict(
    task="kt",
    batch_size=32,
    seq_len=50,
    max_tokens=32,
    epochs=1,
    lr_encoder=5e-5,
    lr_cf=1e-3,
    progress=False,
    export=False,
)


def settings(chunks: list[int]) -> list[tuple[str, int, bool]]:
    """(label, chunk, checkpointing): the whole step in one chunk, then each chunk size, each
    without and with gradient checkpointing."""
    out = [("one chunk (whole step)", ONE_CHUNK, False)]
    for chunk in chunks:
        out.append((f"chunks of {chunk}", chunk, False))
        out.append((f"chunks of {chunk} + checkpointing", chunk, True))
    return out


def measure(opts: Options, data, steps: int) -> dict:
    """Train ``steps`` Single-step steps; the largest activations kept and the time per step."""
    from gram_scale.trainer import setup

    s = setup(opts, data)
    cuda = s.runner.device.type == "cuda"
    batches = s.task.train_batches(0)
    uniques, times = [], []
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        res = s.strategy.step(next(batches), step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        uniques.append(res.unique)
    return {
        "unique_items_per_step": sum(uniques) / len(uniques),
        "activation_bytes": s.runner.peak_activation_bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "seconds_per_step": min(times[1:] or times),  # the first step warms caches up
        "recomputed_rows": s.runner.item_recomputes,
    }


def table(rows: list[dict]) -> str:
    """Markdown table of the measured settings, each against the one-chunk row."""
    base = rows[0]["activation_bytes"]
    lines = [
        "| setting | unique items / step | activations kept | vs one chunk | CUDA peak | "
        "s / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cuda = "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / MiB:,.0f} MiB"
        lines.append(
            f"| {r['setting']} | {r['unique_items_per_step']:.0f} | "
            f"{r['activation_bytes'] / MiB:,.1f} MiB | "
            f"{100 * r['activation_bytes'] / base:.1f}% | {cuda} | "
            f"{r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def checkpointing_savings(rows: list[dict]) -> list[str]:
    """One line per chunk size: the activations gradient checkpointing saves."""
    out = []
    by = {r["setting"]: r for r in rows}
    for r in rows:
        plain = by.get(r["setting"].removesuffix(" + checkpointing"))
        if r["setting"].endswith("checkpointing") and plain:
            saved = 1 - r["activation_bytes"] / plain["activation_bytes"]
            out.append(
                f"{plain['setting']}: gradient checkpointing keeps "
                f"{r['activation_bytes'] / MiB:,.1f} MiB instead of "
                f"{plain['activation_bytes'] / MiB:,.1f} MiB ({100 * saved:.0f}% saved)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write ``results.json`` and ``results.md``."""
    from gram_scale.data import synth
    from gram_scale.data.load import generate_once, load_data

    p = argparse.ArgumentParser(prog="python -m gram_scale.bench.memory", description=__doc__)
    p.add_argument(
        "--chunks", default="16,64", help="chunk sizes (--encoder-batch-size), comma-separated"
    )
    p.add_argument("--steps", type=int, default=2, help="Single-step steps per setting")
    p.add_argument("--encoder", default="", help="encoder folder; empty = all-MiniLM-L6-v2")
    p.add_argument(
        "--cache-dir", default="", help="generated data; empty = $GRAM_CACHE or ~/.cache"
    )
    p.add_argument("--out", default="outputs/bench-memory", help="results folder")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        if not chunks or min(chunks) < 1 or args.steps < 1:
            raise ValueError
    except ValueError:
        print(
            f"error: --chunks {args.chunks!r} / --steps {args.steps}: positive integers expected",
            file=sys.stderr,
        )
        return EXIT_INPUT_ERROR
    try:
        base = validate(Options(**OPTIONS, encoder=args.encoder, cache_dir=args.cache_dir))
        folder = base.resolved_cache_dir() / f"bench-memory-kt-{'-'.join(map(str, DATA.values()))}"
        base.data = str(generate_once(folder, lambda tmp: synth.write_kt(tmp, **DATA)))
        data = load_data(base)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    rows = []
    for label, chunk, ckpt in settings(chunks):
        # calls cut by rows only (--encoder-tokens 0): a step of several calls is re-encoded
        # call by call, so the graph kept is one call's
        opts = validate(
            dataclasses.replace(
                base,
                strategy="single",
                encoder_batch_size=chunk,
                encoder_tokens=0,
                gradient_checkpointing=ckpt,
            )
        )
        rows.append(
            {
                "setting": label,
                "chunk": chunk,
                "checkpointing": ckpt,
                **measure(opts, data, args.steps),
            }
        )
        print(f"measured: {label}", file=sys.stderr, flush=True)
    device = rows and ("cuda" if rows[0]["cuda_peak_bytes"] is not None else "cpu")
    text = "\n".join([table(rows), "", *checkpointing_savings(rows)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
