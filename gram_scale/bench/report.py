"""The benchmark's report: table rows from the runs' records, the targets, ``results.md`` and
``results.png`` (valid AUC against training time), and the machine they were measured on."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

from gram_scale.bench.workloads import UNSORTED
from gram_scale.errors import InputError

METRIC = "auc"  # the main valid metric of both tasks (KTTask.main_metric, NewsTask.main_metric)
MiB = 1024 * 1024
# dense bf16 peak of one GPU (TFLOP/s, no sparsity), keyed by a substring of
# torch.cuda.get_device_name(): the first key found in the name counts
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---- the machine ----------------------------------------------------------------------------
def machine() -> dict:
    """CPU, cores, GPU, library versions and date of this benchmark."""
    from importlib import metadata

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "load_average_at_start": os.getloadavg()[0],
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }


def machine_line(m: dict) -> str:
    """The machine in one line, for titles and the table header."""
    gpu = m["gpu"] or "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, {gpu}"


# ---- the encoder's model FLOPs -------------------------------------------------------------
def encoder_flops(counters: dict, shape: dict | None) -> float | None:
    """Model FLOPs of a run's encoder calls, counted on padded tokens (rows x each call's longest
    text: what the hardware computes, padding included), with N = the encoder's weights outside
    its embedding tables: forward 2 N per token plus 4 x layers x hidden per query-key pair of
    attention (its two matrix products, QK^T and AV); backward twice the forward's (4 N and
    8 x layers x hidden). Attention counts 0 where the shape or the pair counters are missing;
    recomputed activations (gradient checkpointing) are not model FLOPs and are not counted.
    None for a run from before the shape was recorded."""
    if not shape or "padded_forward" not in counters:
        return None
    n, layers, hidden = shape["params"], shape.get("layers"), shape.get("hidden")
    flops = 2 * n * counters["padded_forward"] + 4 * n * counters["padded_backward"]
    if layers and hidden:
        pairs_fwd = counters.get("attention_pairs_forward", 0)
        pairs_bwd = counters.get("attention_pairs_backward", 0)
        flops += 4 * layers * hidden * pairs_fwd + 8 * layers * hidden * pairs_bwd
    return float(flops)


def peak_tflops(gpu: str | None) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s from ``PEAK_BF16_TFLOPS``; None for a CPU or a
    GPU not in the table."""
    if not gpu:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in gpu), None)


def mfu(tflops_per_s: float | None, gpu: str | None) -> float | None:
    """Model FLOPs utilisation: the encoder's model TFLOP/s per GPU over the card's dense bf16
    peak (None on a CPU, an unknown GPU, or without a rate)."""
    peak = peak_tflops(gpu)
    return None if tflops_per_s is None or peak is None else tflops_per_s / peak


def _encoder_rate(metrics: dict) -> float | None:
    """The encoder's model TFLOP/s per process over its own seconds (None when not recorded)."""
    flops = encoder_flops(metrics["counters"], metrics.get("encoder_flops_shape"))
    seconds = metrics.get("encoder_seconds") or 0.0
    if flops is None or seconds <= 0:
        return None
    return flops / (seconds * metrics.get("processes", 1)) / 1e12


# ---- table rows ------------------------------------------------------------------------------
def summarise(runs: list[dict], steps_per_epoch: int, extrapolated: bool) -> dict:
    """One run's figures from its repeats and seeds (each a ``run_child`` record); accuracy is
    the mean over seeds of each seed's first repeat, times the median of all.

    Per-epoch figures are totals scaled by steps per epoch / steps done, which is an exact
    division for full runs and the extrapolation for a run cut short by --max-steps."""
    first = runs[0]["metrics"]
    by_seed: dict[int, dict] = {}  # each seed's first repeat carries its accuracy
    for r in runs:
        by_seed.setdefault(r.get("seed", 0), r["metrics"])
    steps = first["steps"]
    per_epoch = steps_per_epoch / max(steps, 1)
    times = [
        r["metrics"]["train_seconds"] * steps_per_epoch / max(r["metrics"]["steps"], 1)
        for r in runs
    ]
    counters = first["counters"]
    encoder_times = [
        r["metrics"]["encoder_seconds"] * steps_per_epoch / max(r["metrics"]["steps"], 1)
        for r in runs
        if r["metrics"].get("encoder_seconds") is not None
    ]
    rates = [x for x in (_encoder_rate(r["metrics"]) for r in runs) if x is not None]
    row = {
        "extrapolated": extrapolated,
        "steps": steps,
        "epochs_done": steps / steps_per_epoch,
        "time_per_epoch_s": statistics.median(times),
        "time_per_epoch_s_repeats": times,
        "occurrences_per_epoch": counters["occurrences"] * per_epoch,
        "item_forwards_per_epoch": counters["item_forwards"] * per_epoch,
        "item_backwards_per_epoch": counters["item_backwards"] * per_epoch,
        # throughput: item occurrences trained, and the encoder's real tokens (forward and
        # backward), per training second; padded / real: what the calls computed per real token
        "items_per_s": counters["occurrences"] / max(first["train_seconds"], 1e-9),
        "encoder_tokens_per_s": (
            (counters["tokens_forward"] + counters["tokens_backward"])
            / max(first["train_seconds"], 1e-9)
            if "tokens_forward" in counters
            else None  # a run from before the token counters
        ),
        "padded_per_real_token": (
            counters["padded_forward"] / counters["tokens_forward"]
            if counters.get("tokens_forward")
            else None
        ),
        # the encoder's training calls (forward and backward), per epoch; its model TFLOP/s
        # per process over those seconds (encoder_flops); both medians over the repeats
        "encoder_seconds_per_epoch": statistics.median(encoder_times) if encoder_times else None,
        "encoder_tflops_per_s": statistics.median(rates) if rates else None,
        "counters": counters,
        "occurrence_unique_ratio": first["occurrence_unique_ratio"],
        "occurrences_per_backward": (
            counters["occurrences"] / counters["item_backwards"]
            if counters["item_backwards"]
            else None  # a frozen encoder
        ),
        "peak_rss_bytes": max(r["rss"] for r in runs),
        "encoder_activation_bytes": max(
            r["metrics"]["encoder_peak_activation_bytes"] for r in runs
        ),
        "cuda_peak_bytes": first.get("cuda_peak_bytes"),
        "seeds": list(by_seed),
        "valid": None if extrapolated else _mean([m["valid"] for m in by_seed.values()]),
        "test": None if extrapolated else _mean([m["test"] for m in by_seed.values()]),
        "valid_per_seed": None
        if extrapolated
        else [m["valid"].get(METRIC) for m in by_seed.values()],
        "test_per_seed": None
        if extrapolated
        else [m["test"].get(METRIC) for m in by_seed.values()],
        "curve": []
        if extrapolated
        else [[e["train_seconds"], e["valid"].get(METRIC)] for e in first["epochs"]],
        "runs": [
            {
                "dir": r["dir"],
                "argv": r["argv"],
                "steps": r["metrics"]["steps"],
                "train_seconds": r["metrics"]["train_seconds"],
                "peak_rss_bytes": r["rss"],
                "wall_seconds": r["wall"],
                "other_cores": r["other_cores"],
                "seed": r.get("seed", 0),
                "reused": bool(r.get("reused")),
                "date": r.get("date"),
            }
            for r in runs
        ],
    }
    if extrapolated:
        row["note"] = (
            f"extrapolated: trained {steps} steps, epoch time = time / {steps} x "
            f"{steps_per_epoch} steps per epoch; no accuracy measured"
        )
    return row


def _mean(splits: list[dict]) -> dict:
    """Each metric's mean over seeds (a split skipped in the first seed stays skipped)."""
    if "skipped" in splits[0]:
        return splits[0]
    out = {}
    for k, v in splits[0].items():
        values = [m.get(k) for m in splits]
        numbers = all(isinstance(x, (int, float)) for x in values)
        out[k] = statistics.fmean(values) if numbers else v
    return out


# ---- targets and Markdown -------------------------------------------------------------------
def rows_in_order(result: dict) -> list[tuple[str, dict]]:
    """``(name, row)`` per strategy in run order (results.json itself sorts its keys)."""
    rows = result["strategies"]
    return [(name, rows[name]) for name in result.get("order", rows)]


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MiB:,.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.2g}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mfu(row: dict, gpu: str | None) -> str:
    if peak_tflops(gpu) is None:
        return "n/a (peak unknown)"
    share = mfu(row.get("encoder_tflops_per_s"), gpu)
    return "-" if share is None else f"{100 * share:.1f}%"


def _per_seed(values: list | None) -> str:
    if values is None:
        return "n/a"
    return ", ".join("n/a" if v is None or v != v else f"{v:.4f}" for v in values)


def _metric(d: dict | None) -> str:
    v = None if d is None else d.get(METRIC)
    return "n/a" if v is None or v != v else f"{v:.4f}"


def _auc(row: dict, split: str) -> float | None:
    v = None if row[split] is None else row[split].get(METRIC)
    return None if v is None or v != v else v


# the share of the fine-tuning gain each Multi-step window must keep (its name -> share)
GAIN_KEPT = {"multi 1E": 0.8, "multi 0.5E": 0.6, "multi 10": 0.6}


def gain_kept(run: dict, e2e: dict, frozen: dict, split: str) -> dict:
    """How much of e2e's gain over the frozen encoder a run keeps on a split:
    (run - frozen) / (e2e - frozen) of the seed means, and of each seed alone."""
    mean = (_auc(run, split) - _auc(frozen, split)) / (_auc(e2e, split) - _auc(frozen, split))
    seeds = [
        (r - f) / (e - f) if e != f else float("nan")
        for r, e, f in zip(
            run[f"{split}_per_seed"], e2e[f"{split}_per_seed"], frozen[f"{split}_per_seed"]
        )
    ]
    return {
        "mean": mean,
        "per_seed": seeds,
        "std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0,
    }


def _accuracy_targets(rows: dict) -> list[dict]:
    """multi 1E within 1 point of e2e; with a frozen run, the fine-tuning gain: e2e at least 3
    test points above frozen, and the share of it each Multi-step window keeps (GAIN_KEPT, valid
    and test). Means over the seeds."""
    e2e, one_e, frozen = rows["e2e"], rows["multi 1E"], rows.get("frozen")
    seeds = len(e2e.get("seeds") or [0])
    mean = f", mean of {seeds} seeds" if seeds > 1 else ""
    if e2e["extrapolated"]:
        return [
            {
                "name": "multi 1E AUC within 1 point of e2e",
                "met": None,
                "text": "multi 1E AUC vs e2e: not measured, e2e was extrapolated from "
                f"{e2e['steps']} steps and has no accuracy",
            }
        ]
    out = []
    gaps = {split: _auc(one_e, split) - _auc(e2e, split) for split in ("valid", "test")}
    out.append(
        {
            "name": "multi 1E AUC within 1 point of e2e (valid and test)",
            "met": all(abs(g) <= 0.01 for g in gaps.values()),
            "text": f"multi 1E vs e2e{mean}: valid {100 * gaps['valid']:+.2f}, test "
            f"{100 * gaps['test']:+.2f} AUC points (limit 1)",
        }
    )
    if frozen is None:
        return out
    gain = _auc(e2e, "test") - _auc(frozen, "test")
    out.append(
        {
            "name": "e2e test AUC >= frozen + 3 points",
            "met": gain >= 0.03,
            "text": f"e2e test AUC {_auc(e2e, 'test'):.4f} vs frozen "
            f"{_auc(frozen, 'test'):.4f}{mean}: {100 * gain:+.2f} points "
            "(need +3)",
        }
    )
    for name, need in GAIN_KEPT.items():
        if name not in rows:
            continue
        kept = {split: gain_kept(rows[name], e2e, frozen, split) for split in ("valid", "test")}
        per_seed = (
            "; ".join(
                f"{split} per seed "
                + ", ".join(f"{100 * k:.0f}%" for k in kept[split]["per_seed"])
                + f" (std {100 * kept[split]['std']:.0f})"
                for split in ("valid", "test")
            )
            if seeds > 1
            else ""
        )
        out.append(
            {
                "name": f"{name} keeps >= {100 * need:.0f}% of the fine-tuning gain",
                "met": all(k["mean"] >= need for k in kept.values()),
                "kept": kept,
                "text": f"{name} keeps {100 * kept['valid']['mean']:.0f}% (valid) and "
                f"{100 * kept['test']['mean']:.0f}% (test) of e2e's gain over frozen"
                f"{mean} (need {100 * need:.0f}%)" + (f"; {per_seed}" if per_seed else ""),
            }
        )
    return out


# the encoder time the sort by length must save: unsorted / sorted, per strategy
MIN_SORT_SAVING = 1.3
# sorted and unsorted runs differ only by float rounding; their AUCs must agree this closely
SORT_AUC_LIMIT = 0.005


def twins(result: dict) -> list[tuple[str, str]]:
    """``(sorted, unsorted)`` row names of every run that also ran with its calls cut in the
    items' own order, in run order."""
    rows = result["strategies"]
    return [
        (name.removesuffix(UNSORTED), name)
        for name, _ in rows_in_order(result)
        if name.endswith(UNSORTED) and name.removesuffix(UNSORTED) in rows
    ]


def _ratio(over: float | None, under: float | None) -> float | None:
    return None if over is None or not under else over / under


def sort_saving(by_length: dict, given: dict) -> dict:
    """What sorting by length saves a run: unsorted over sorted encoder seconds per epoch
    (``encoder``) and padded per real token (``padded``); None where a run lacks the figure."""
    seconds, padded = "encoder_seconds_per_epoch", "padded_per_real_token"
    return {
        "encoder": _ratio(given.get(seconds), by_length.get(seconds)),
        "padded": _ratio(given.get(padded), by_length.get(padded)),
    }


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _padded(row: dict) -> str:
    value = row.get("padded_per_real_token")
    return "-" if value is None else f"{value:.2f}"


def _chunk_order_targets(result: dict) -> list[dict]:
    """Per strategy with an unsorted twin: the sort saves at least MIN_SORT_SAVING of the
    encoder's time, and both runs reach the same AUC (within SORT_AUC_LIMIT)."""
    rows, out = result["strategies"], []
    for name, twin in twins(result):
        saving = sort_saving(rows[name], rows[twin])["encoder"]
        need = f"{MIN_SORT_SAVING:g}x"
        title = f"{name}: sorting saves >= {need} of the encoder time"
        text = f"{name}: encoder time unsorted / sorted {_times(saving)} (need {need})"
        met = None if saving is None else saving >= MIN_SORT_SAVING
        out.append({"name": title, "met": met, "text": text})
        title = f"{name}: sorted and unsorted AUCs equal (valid and test)"
        aucs = {s: (_auc(rows[name], s), _auc(rows[twin], s)) for s in ("valid", "test")}
        if any(v is None for pair in aucs.values() for v in pair):
            text = f"{name} sorted vs unsorted AUC: not measured (no accuracy)"
            out.append({"name": title, "met": None, "text": text})
            continue
        gaps = {split: b - a for split, (a, b) in aucs.items()}
        text = (
            f"{name} unsorted vs sorted: valid {100 * gaps['valid']:+.3f}, test "
            f"{100 * gaps['test']:+.3f} AUC points (limit {100 * SORT_AUC_LIMIT:g}: the order "
            "changes float rounding only)"
        )
        met = all(abs(g) <= SORT_AUC_LIMIT for g in gaps.values())
        out.append({"name": title, "met": met, "text": text})
    return out


def _chunk_order_lines(result: dict) -> list[str]:
    """The sort's saving per strategy, side by side: encoder seconds per epoch and padded /
    real tokens, unsorted over sorted, and both runs' AUCs."""
    pairs = twins(result)
    if not pairs:
        return []
    rows = result["strategies"]
    lines = [
        "",
        "Chunk order: each strategy also ran with its encoder calls cut in the items' own order "
        '(`--chunk-order given`, "unsorted") instead of sorted by token length; unsorted / '
        "sorted, from the same benchmark:",
    ]
    for name, twin in pairs:
        a, b = rows[name], rows[twin]
        saving = sort_saving(a, b)
        seconds = [_seconds(r.get("encoder_seconds_per_epoch")) for r in (b, a)]
        lines.append(
            f"- {name}: encoder {seconds[0]} s / epoch unsorted, {seconds[1]} sorted: "
            f"{_times(saving['encoder'])}; padded / real tokens {_padded(b)} unsorted, "
            f"{_padded(a)} sorted: {_times(saving['padded'])}; valid AUC {_metric(a['valid'])} "
            f"sorted, {_metric(b['valid'])} unsorted; test AUC {_metric(a['test'])} sorted, "
            f"{_metric(b['test'])} unsorted."
        )
    return lines


def targets(result: dict) -> list[dict]:
    """The issue's targets, each ``{name, met, text}``; ``met`` is None where not measurable."""
    rows, pred = result["strategies"], result["predicted"]
    e2e, one_e = rows["e2e"], rows["multi 1E"]
    extra = " (e2e time extrapolated)" if e2e["extrapolated"] else ""
    out = []
    if "single" in rows:
        single = rows["single"]
        r_meas = single["occurrence_unique_ratio"]
        need = 0.8 * r_meas
        out.append(
            {
                "name": "single speed-up >= 0.8 x measured R_batch",
                "met": single["speedup"] >= need,
                "text": f"single speed-up {single['speedup']:.2f}x vs 0.8 x R_batch "
                f"{r_meas:.2f} = {need:.2f}x{extra}",
            }
        )
    need = 0.5 * pred["R_epoch"]
    out.append(
        {
            "name": "multi 1E speed-up >= 0.5 x R_epoch",
            "met": one_e["speedup"] >= need,
            "text": f"multi 1E speed-up {one_e['speedup']:.2f}x vs 0.5 x R_epoch "
            f"{pred['R_epoch']:.1f} = {need:.1f}x{extra}",
        }
    )
    need = result.get("min_1e_speedup") or 0
    if need:
        b = result.get("bound") or {}
        bound = (
            f"; cost-model bound e / c = {b['bound_e_over_c']:.0f}x, predicted for this "
            f"workload {b['predicted_1E_speedup']:.0f}x"
            if "bound_e_over_c" in b
            else ""
        )
        out.append(
            {
                "name": f"multi 1E speed-up >= {need:g}x",
                "met": one_e["speedup"] >= need,
                "text": f"multi 1E speed-up {one_e['speedup']:.1f}x vs {need:g}x{extra}{bound}",
            }
        )
    out += _accuracy_targets(rows)
    out += _chunk_order_targets(result)
    key = "cuda_peak_bytes" if result["machine"]["gpu"] else "encoder_activation_bytes"
    what = "CUDA peak memory" if key == "cuda_peak_bytes" else "encoder activation memory"
    for name, row in rows_in_order(result):
        if not name.startswith("multi"):
            continue
        share = row[key] / max(e2e[key], 1)
        out.append(
            {
                "name": f"{name} {what} <= 20% of e2e",
                "met": share <= 0.2,
                "text": f"{name} {what} {_mib(row[key])} MiB = {100 * share:.1f}% of e2e "
                f"{_mib(e2e[key])} MiB (limit 20%)",
            }
        )
    o = result.get("overhead") or {}
    if "other_share" in o:
        out.append(
            {
                "name": f"multi {o['window']} time outside encoder and CF <= 15% of a step",
                "met": o["other_share"] <= 0.15,
                "text": f"multi {o['window']} step outside the encoder and the CF model: "
                f"{1e3 * o['other_s']:.2f} ms of {1e3 * o['step_s']:.1f} ms "
                f"({100 * o['other_share']:.1f}%; limit 15%)",
            }
        )
    return out


def _contention(result: dict) -> list[str]:
    """A line on the CPU that other processes took during the runs, and a warning if any."""
    seen = [
        (run["other_cores"], name)
        for name, row in rows_in_order(result)
        for run in row["runs"]
        if run.get("other_cores") is not None
    ]
    if not seen:
        return []
    worst, where = max(seen)
    mean = sum(v for v, _ in seen) / len(seen)
    text = (
        f"Other processes on this machine used {mean:.2f} cores on average during the runs "
        f"(at most {worst:.2f}, during {where})."
    )
    if worst > 0.25:
        text += " Warning: the runs shared the CPU, so their timings are not reliable."
    return [text, ""]


def _multi_options(result: dict) -> list[str]:
    """The line naming what ``--multi-options`` changed of every Multi-step run (none: no
    line)."""
    changed = result.get("multi_options") or {}
    if not changed:
        return []
    flags = ", ".join(f"{k} = {v}" for k, v in sorted(changed.items()))
    return [f"Every Multi-step run changed these options from the others': {flags}.", ""]


def markdown(result: dict) -> str:
    """``results.md``: header, one table row per strategy, the targets and the bound."""
    m, stats, pred = result["machine"], result["stats"], result["predicted"]
    cuda = m["gpu"] is not None
    tokens = (
        ""
        if not stats.get("tokens_per_item")
        else f", {stats['tokens_per_item']:.1f} tokens per item"
    )
    head = [
        "strategy",
        "time / epoch (s)",
        "speed-up vs e2e",
        "items / s",
        "encoder tokens / s",
        "padded / real tokens",
        "encoder s / epoch",
    ]
    if cuda:
        head.append("encoder MFU (bf16 peak)")
    head += [
        "encoder fwd items / epoch",
        "encoder bwd items / epoch",
        "occurrences / encoder bwd",
        "occ / unique per step",
        "peak RSS (MiB)",
        "encoder activations (MiB)",
    ]
    if cuda:
        head.append("CUDA peak (MiB)")
    seeds = result.get("seeds") or [0]
    many = len(seeds) > 1
    mean = " (mean)" if many else ""
    head += [f"valid {METRIC.upper()}{mean}", f"test {METRIC.upper()}{mean}"]
    if many:
        head += [f"valid {METRIC.upper()} per seed", f"test {METRIC.upper()} per seed"]
    lines = [
        f"# Benchmark: {result['workload']}",
        "",
        f"Machine: {machine_line(m)}; torch threads {m['torch_threads']}, load average "
        f"{m['load_average_at_start']:.1f} at start; python {m['versions']['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "python" and v)
        + f"; {m['date']}.",
        "",
        f"Workload: {' '.join(result['description'].split())}",
        "",
        f"{result['epochs']} epoch(s), {result['steps_per_epoch']} steps per epoch, "
        f"{stats['occurrences']:,} item occurrences over {stats['distinct_items']} distinct "
        f"items per epoch{tokens}. Predicted "
        f"from the data (gram_scale.stats): R_batch = {pred['R_batch']:.2f}, R_epoch = "
        f"{pred['R_epoch']:.1f}. Training seed(s) {', '.join(map(str, seeds))} (the generated "
        f"data stay the same; the seed draws the split of KT users, initialisation, batch order "
        f"and dropout). Timed figures are the median of {result['repeats']} repeat(s) per seed, "
        f"runs alternating; training time excludes evaluation. Whole benchmark: "
        f"{result['total_seconds']:.0f} s wall.",
        "",
        *_multi_options(result),
        *_contention(result),
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name, r in rows_in_order(result):
        mark = " (extrapolated)" if r["extrapolated"] else ""
        cells = [
            f"{name}{mark}",
            f"{r['time_per_epoch_s']:.2f}{mark}",
            f"{r['speedup']:.2f}x",
            _rate(r.get("items_per_s")),
            _rate(r.get("encoder_tokens_per_s")),
            "-" if r.get("padded_per_real_token") is None else f"{r['padded_per_real_token']:.2f}",
            _seconds(r.get("encoder_seconds_per_epoch")),
        ]
        if cuda:
            cells.append(_mfu(r, m["gpu"]))
        cells += [
            f"{r['item_forwards_per_epoch']:,.0f}",
            f"{r['item_backwards_per_epoch']:,.0f}",
            "-"
            if r["occurrences_per_backward"] is None
            else f"{r['occurrences_per_backward']:.2f}",
            f"{r['occurrence_unique_ratio']:.2f}",
            _mib(r["peak_rss_bytes"]),
            _mib(r["encoder_activation_bytes"]),
        ]
        if cuda:
            cells.append(_mib(r["cuda_peak_bytes"]))
        cells += [_metric(r["valid"]), _metric(r["test"])]
        if many:
            cells += [_per_seed(r["valid_per_seed"]), _per_seed(r["test_per_seed"])]
        lines.append("| " + " | ".join(cells) + " |")
    for name, r in rows_in_order(result):
        if r.get("note"):
            lines += ["", f"{name} {r['note']}."]
    reused = [
        (name, run["date"])
        for name, r in rows_in_order(result)
        for run in r["runs"]
        if run.get("reused")
    ]
    if reused:
        lines += [
            "",
            "Reused from an earlier benchmark with the same flags (--reuse), trained "
            + ", ".join(sorted({f"{name} on {date}" for name, date in reused}))
            + ".",
        ]
    lines += _chunk_order_lines(result)
    lines += ["", "Targets:"]
    for t in result["targets"]:
        verdict = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        lines.append(f"- {verdict}: {t['text']}")
    rows = result["strategies"]
    b = result.get("bound")
    if b and "bound_e_over_c" in b:
        one_e = rows["multi 1E"]["speedup"]
        single = f"{rows['single']['speedup']:.2f}x" if "single" in rows else "not run"
        lines += [
            "",
            f"Bound (epoch-time cost model; e, f, c measured in the benchmark process on this "
            f"machine): e = {1e3 * b['e_s']:.2f} ms per item (encoder forward+backward, chunks "
            f"of {b['chunk']}), f = {1e3 * b['f_s']:.2f} ms per item (forward only), c = "
            f"{1e6 * b['c_s']:.1f} us per interaction (CF forward+backward+step). The 1E "
            f"speed-up tends to e / c = {b['bound_e_over_c']:.0f}x as R_epoch grows; for this "
            f"workload the model predicts single {b['predicted_single_speedup']:.2f}x and 1E "
            f"{b['predicted_1E_speedup']:.1f}x (measured {single} and {one_e:.1f}x).",
        ]
    o = result.get("overhead")
    if o and "other_share" in o:
        lines += [
            "",
            f"Multi-step {o['window']} step, one epoch trained in the benchmark process with the "
            f"encoder and CF calls timed: {1e3 * o['step_s']:.1f} ms per step on average, of "
            f"which encoder {1e3 * o['encoder_s']:.1f} ms, CF model {1e3 * o['cf_s']:.1f} ms and "
            f"the rest (item table, unique index, exchange, the step's scalar collective, "
            f"checks) {1e3 * o['other_s']:.2f} ms = {100 * o['other_share']:.1f}%.",
        ]
    return "\n".join(lines) + "\n"


# ---- plot ----------------------------------------------------------------------------------
def check_plot() -> None:
    """Raise InputError when matplotlib is missing (it is the optional ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            None, None, "matplotlib is not installed: pip install 'gram-scale[bench]'"
        ) from None


def plot(result: dict, path: Path) -> None:
    """Write the plot; an extrapolated e2e has no accuracy, so it shows as its epoch ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = []
    for name, row in rows_in_order(result):
        if row["extrapolated"]:
            ends = [row["time_per_epoch_s"] * (k + 1) for k in range(result["epochs"])]
            for k, x in enumerate(ends):
                ax.axvline(
                    x,
                    color="grey",
                    linestyle="--",
                    linewidth=1,
                    label=f"{name}: epoch ends, extrapolated from {row['steps']} steps "
                    "(no accuracy)"
                    if k == 0
                    else None,
                )
            xs += ends
            continue
        points = [(t, v) for t, v in row["curve"] if v is not None]
        if not points:
            continue
        t, v = zip(*points)
        ax.plot(t, v, marker="o", label=f"{name} ({row['speedup']:.1f}x vs e2e per epoch)")
        xs += t
    if xs and max(xs) / max(min(xs), 1e-9) > 20:  # seconds to many minutes: keep all readable
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training time (s, log scale; evaluation excluded)")
    else:
        ax.set_xlabel("cumulative training time (s; evaluation excluded)")
    ax.set_ylabel(f"valid {METRIC.upper()} (after each epoch)")
    ax.set_title(
        f"GRAM benchmark '{result['workload']}': valid {METRIC.upper()} vs training "
        f"time\n{machine_line(result['machine'])}",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG under the real name
