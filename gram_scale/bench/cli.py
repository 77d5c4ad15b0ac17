"""The benchmark's command line: ``python -m gram_scale.bench --workload NAME [...]``.

Trains the workload's runs (``Workload.runs``: by default ``e2e``, ``single`` and ``multi`` with
windows of 10 steps, half an epoch and one epoch; ``frozen`` where fine-tuning is the question),
each in its own child process, for every ``--seeds`` seed and ``--repeats`` times. It writes
``results.json`` (every figure and the machine), ``results.md`` (a table and the targets) and
``results.png`` (valid AUC against training time) into ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from gram_scale.bench import costs, report
from gram_scale.bench.children import (
    RunFailed,
    kill_children,
    reuse_child,
    run_child,
    run_options,
)
from gram_scale.bench.llm import LLM_WORKLOADS  # memory workloads: train and measure
from gram_scale.bench.workloads import WORKLOADS, prepare_data, prepare_encoder
from gram_scale.config import Options, validate
from gram_scale.errors import EXIT_INPUT_ERROR, InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, instead of argparse's usage dump
        raise InputError(None, None, f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = _Parser(
        prog="python -m gram_scale.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workload",
        required=True,
        metavar="{" + ",".join((*WORKLOADS, *LLM_WORKLOADS)) + "}",
        help="what to train (see WORKLOADS in gram_scale/bench/workloads.py; llm-1b and "
        "llm-3b: gram_scale/bench/llm.py)",
    )
    p.add_argument("--out", default="", help="output folder; empty = outputs/bench/<workload>")
    p.add_argument("--encoder", default="", help="encoder folder instead of the workload's")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per strategy and seed (median timed)"
    )
    p.add_argument(
        "--seeds",
        default="0",
        metavar="S[,S...]",
        help="training seeds (--seed of every run: split of KT users, initialisation, "
        "order, dropout); the generated data stay the same. AUCs are averaged "
        "over the seeds",
    )
    p.add_argument(
        "--reuse",
        default="",
        metavar="RUN[,RUN...]",
        help="take these runs (e.g. e2e,frozen,single) from an earlier benchmark into "
        "the same --out where one was trained with the same flags, instead of "
        "training them again; the table marks them",
    )
    p.add_argument(
        "--e2e-steps",
        type=int,
        default=None,
        metavar="K",
        help="the workload's capped runs (e2e) train K steps and their epoch time is "
        "extrapolated (0 = full runs); default: the workload's",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs; default: workload's")
    p.add_argument(
        "--config",
        default="none",
        metavar="PATH|none",
        help="DeepSpeed JSON for the encoder of every run",
    )
    p.add_argument(
        "--cache-dir", default="", help="generated data; empty = $GRAM_CACHE or ~/.cache"
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the workload's data generator instead of its own (a second "
        "generated data set of the same shape, e.g. to choose settings on)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, one thread each (for accuracy studies: the runs "
        "then share the CPU, so their timings are not comparable)",
    )
    p.add_argument(
        "--multi-options",
        default="",
        metavar="FLAGS",
        help="training flags for every Multi-step run only, written with '=': "
        "--multi-options='--cf-refresh 10' (an "
        "ablation of the default rule: with --reuse e2e,frozen the other runs are taken from "
        "an earlier benchmark in the same --out)",
    )
    return p


# what each run sets itself (run_options): not for --multi-options
RUN_FIELDS = ("strategy", "window", "freeze_encoder", "seed", "output_dir", "max_steps")


def multi_overrides(flags: str) -> dict:
    """The Options fields that ``flags`` (training flags) set to other than their defaults; a
    bad flag, value, or one that each run sets itself, raises InputError naming
    --multi-options."""
    from gram_scale.config import build_parser as train_parser

    parser = train_parser("--multi-options")
    defaults = vars(parser.parse_args([]))
    try:
        words = shlex.split(flags)
    except ValueError as exc:
        raise InputError("--multi-options", None, f"cannot split {flags!r}: {exc}") from None
    given = vars(parser.parse_args(words))
    out = {k: v for k, v in given.items() if v != defaults[k]}
    fixed = sorted(k for k in out if k in RUN_FIELDS)
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise InputError("--multi-options", None, f"{names} is set by each run itself")
    validate(Options(**dict(given, strategy="multi")))  # a bad value fails now, not mid-way
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the flags; the first bad one raises InputError naming it."""
    args = build_parser().parse_args(argv)
    if args.workload not in (*WORKLOADS, *LLM_WORKLOADS):
        choices = ", ".join((*WORKLOADS, *LLM_WORKLOADS))
        raise InputError("--workload", None, f"must be one of {choices}, got {args.workload!r}")
    if args.repeats < 1:
        raise InputError("--repeats", None, f"must be at least 1, got {args.repeats}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise InputError(
            "--seeds", None, f"must be integers joined by commas, got {args.seeds!r}"
        ) from None
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError("--seeds", None, f"names a seed twice: {args.seeds}")
    args.reuse = [name.strip() for name in args.reuse.split(",") if name.strip()]
    if args.workload in WORKLOADS:
        labels = [run.label for run in WORKLOADS[args.workload].runs]
        unknown = [name for name in args.reuse if name not in labels]
        if unknown:
            raise InputError("--reuse", None, f"{unknown} not among the runs {labels}")
    if args.e2e_steps is not None and args.e2e_steps < 0:
        raise InputError("--e2e-steps", None, f"must be 0 or more, got {args.e2e_steps}")
    if args.epochs is not None and args.epochs < 1:
        raise InputError("--epochs", None, f"must be at least 1, got {args.epochs}")
    if args.jobs < 1:
        raise InputError("--jobs", None, f"must be at least 1, got {args.jobs}")
    args.multi_overrides = multi_overrides(args.multi_options)
    if args.data_seed is not None and args.data_seed < 0:
        raise InputError("--data-seed", None, f"must be 0 or more, got {args.data_seed}")
    name = args.workload + ("" if args.data_seed is None else f"-data{args.data_seed}")
    out = Path(args.out or Path("outputs") / "bench" / name)
    if out.exists() and not out.is_dir():
        raise InputError(out, None, "--out exists and is not a folder")
    args.out = out
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def shared_options(workload, config: str, cache_dir: str) -> dict:
    """The Options fields every run of ``workload`` shares. No run exports, except under
    --save-best, whose metrics are those of the best valid model it exports."""
    return dict(
        workload.options,
        task=workload.task,
        config=config,
        progress=False,
        export=bool(workload.options.get("save_best")),
        cache_dir=cache_dir,
    )


def bench(args: argparse.Namespace) -> dict:
    """Train the workload's runs (alternating, per seed and repeat) and write the outputs."""
    import torch

    from gram_scale.export import write_json
    from gram_scale.stats import compute

    report.check_plot()  # fail before minutes of training, not after
    start = time.perf_counter()
    workload = WORKLOADS[args.workload]
    if args.data_seed is not None and "seed" in workload.generator:
        workload = dataclasses.replace(
            workload, generator=dict(workload.generator, seed=args.data_seed)
        )
    info = report.machine()
    options = shared_options(workload, args.config, args.cache_dir)
    if args.epochs is not None:
        options["epochs"] = args.epochs
    cache = Options(**options).resolved_cache_dir()
    if args.encoder:  # checked before any generation
        validate(Options(**dict(options, encoder=args.encoder)))
    options["data"] = str(prepare_data(args.workload, workload, cache))
    options["encoder"] = prepare_encoder(workload, cache, args.encoder)
    base = validate(Options(**options))
    stats = compute(base)
    spe = int(stats["batches"])
    total_steps = spe * base.epochs
    k = workload.e2e_steps if args.e2e_steps is None else args.e2e_steps
    extrapolate = 0 < k < total_steps
    capped = set(workload.capped) if extrapolate else set()
    mode = f"{', '.join(sorted(capped))} extrapolated from {k} steps" if capped else "full runs"
    _say(
        f"bench {args.workload}: {spe} steps/epoch, R_batch {stats['R_batch']:.2f}, "
        f"R_epoch {stats['R_epoch']:.1f}; {mode}"
        + (f"; Multi-step runs with {args.multi_options}" if args.multi_overrides else "")
    )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = workload.runs
    collected: dict[str, list[dict]] = {run.label: [] for run in runs}
    jobs = [(seed, rep, run) for seed in args.seeds for rep in range(args.repeats) for run in runs]
    started = [0]

    def train_one(seed: int, rep: int, run) -> dict:
        name = run.label
        run_dir = out / "runs" / f"{name.replace(' ', '-')}-s{seed}-r{rep + 1}"
        steps = k if name in capped else 0
        opts = validate(run_options(base, run, run_dir, seed, steps, args.multi_overrides))
        started[0] += 1
        _say(
            f"[{started[0]}/{len(jobs)}] {name} (seed {seed}, repeat {rep + 1}/{args.repeats}) ..."
        )
        earlier = reuse_child(opts) if name in args.reuse else None
        if name in args.reuse and earlier is None:
            _say(f"    no earlier run of {name} with these flags in {run_dir}: training it")
        threads = {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {}
        record = earlier or run_child(opts, run_dir / "train.log", threads)
        record["seed"] = seed
        other = (
            ""
            if record["other_cores"] is None
            else f", other processes {record['other_cores']:.2f} cores"
        )
        m = record["metrics"]
        auc = (
            "" if name in capped else f", test AUC {m['test'].get(report.METRIC, float('nan')):.4f}"
        )
        when = f" (reused: trained {record['date']})" if record.get("reused") else ""
        _say(
            f"    {name} (seed {seed}): {m['train_seconds']:.1f} s training, "
            f"{record['wall']:.1f} s wall, peak RSS {record['rss'] / report.MiB:,.0f} MiB"
            f"{other}{auc}{when}"
        )
        return record

    if args.jobs == 1:
        records = [train_one(*job) for job in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(lambda job: train_one(*job), jobs))
    for (_, _, run), record in zip(jobs, records):
        collected[run.label].append(record)

    rows = {
        name: report.summarise(records, spe, name in capped) for name, records in collected.items()
    }
    for run in runs:
        row = rows[run.label]
        row.update(
            strategy=run.strategy,
            window=run.window,
            frozen=run.frozen,
            chunk_order=run.chunk_order or base.chunk_order,
        )
        row["speedup"] = rows["e2e"]["time_per_epoch_s"] / row["time_per_epoch_s"]
        row["mfu"] = report.mfu(row.get("encoder_tflops_per_s"), info["gpu"])
    measured = dataclasses.replace(base, output_dir=str(out / "runs"))
    try:
        cost = costs.measure_costs(measured)
        bound = dict(cost, **costs.cost_model(cost, stats))
    except Exception as exc:  # the bound is optional; a failure must not lose the runs
        _say(f"warning: cost model not measured: {exc}")
        bound = {"error": str(exc)}
    try:
        overhead = costs.measure_overhead(measured)
    except Exception as exc:  # optional too
        _say(f"warning: Multi-step overhead not measured: {exc}")
        overhead = {"error": str(exc)}
    stats["tokens_per_item"] = bound.get("tokens_per_item")
    result = {
        "workload": args.workload,
        "data_seed": args.data_seed,
        "jobs": args.jobs,
        "description": " ".join(workload.doc.split()),
        "command": ["python", "-m", "gram_scale.bench", *sys.argv[1:]],
        "machine": info,
        "cuda": torch.cuda.is_available(),
        "repeats": args.repeats,
        "seeds": args.seeds,
        "epochs": base.epochs,
        "steps_per_epoch": spe,
        "e2e_steps": k if capped else 0,
        "capped": sorted(capped),
        "min_1e_speedup": workload.min_1e_speedup,
        "options": dataclasses.asdict(base),
        "multi_options": args.multi_overrides,  # what every Multi-step run changed of them
        "stats": stats,
        "predicted": {"R_batch": stats["R_batch"], "R_epoch": stats["R_epoch"]},
        "order": list(rows),  # results.json sorts its keys; this keeps the table's row order
        "strategies": rows,
        "bound": bound,
        "overhead": overhead,
        "load_average_at_end": os.getloadavg()[0],
    }
    result["targets"] = report.targets(result)
    result["total_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", result)
    (out / "results.md").write_text(report.markdown(result))
    report.plot(result, out / "results.png")
    return result


def _terminate(signum, frame) -> None:
    # An exception, unlike the default action, lets run_child kill the run it is waiting on;
    # runs waited on by other threads (--jobs) are killed here.
    kill_children()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m gram_scale.bench --workload NAME [...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
        if args.workload in LLM_WORKLOADS:  # not a strategy comparison: its own module
            from gram_scale.bench import llm

            return llm.run(args)
        result = bench(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    md = report.markdown(result)
    start = md.find("Other processes")  # the contention warning belongs with the table
    print(md[start if start >= 0 else md.index("| strategy") :], end="")
    return 0
