"""Benchmark: E2E against GRAM Single-step and Multi-step on one workload, one seed, one data set.

``python -m gram_scale.bench --workload kt-small`` trains five runs, each in its own child
process (``launch/train.py``) so that peak memory is per run: ``e2e``, ``single`` and ``multi``
with windows of 10 steps, half an epoch and one epoch. It writes ``results.json`` (every figure
and the machine), ``results.md`` (a table and the targets of the benchmark issue) and
``results.png`` (valid AUC against training time), and prints the table.

Workloads are in ``WORKLOADS``; each one's ``doc`` says what it measures. Generated data and the
tiny encoder go into the cache folder (``--cache-dir``, ``$GRAM_CACHE`` or ``~/.cache``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gram_scale.config import Options, validate
from gram_scale.errors import EXIT_INPUT_ERROR, InputError

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"
METRIC = "auc"  # the main valid metric of both tasks (KTTask.main_metric, NewsTask.main_metric)
MiB = 1024 * 1024

# the memory workload of gram_scale/bench_llm.py, which trains one run, not five
LLM_WORKLOAD = "llm-1b"

# (strategy, window): the five runs, in the order they alternate when repeated
RUNS: tuple[tuple[str, str | None], ...] = (
    ("e2e", None),
    ("single", None),
    ("multi", "10"),
    ("multi", "0.5E"),
    ("multi", "1E"),
)


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: generated data, encoder and training options."""

    doc: str
    task: str
    generator: dict  # keyword arguments of synth.write_kt / synth.write_mind
    encoder: str  # "tiny" (a random 2-layer BERT built in the cache) or "minilm"
    options: dict = field(default_factory=dict)  # Options fields shared by the five runs
    words_per_item: int = 0  # KT only: lengthen every item text to this many words (0 = keep)
    e2e_steps: int = 0  # default --e2e-steps (0 = train e2e fully)


# Training options of both news workloads (they differ only in data)
NEWS_OPTIONS = dict(
    max_tokens=32,
    batch_size=8,
    history_len=10,
    negatives=4,
    epochs=2,
    lr_encoder=5e-5,
    lr_cf=1e-3,
    encoder_batch_size=16,
)

WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(
        doc="""Smoke test of the benchmark itself (used by tests/test_bench.py), not a speed
        figure: a random 2-layer hidden-32 BERT, so the CF model costs as much as the encoder.
        write_kt(n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1); 16 max tokens,
        batch 4 x seq 12: 27 steps per epoch, so windows of 10 steps, 0.5E (14) and 1E differ
        and 10-step windows straddle epochs. 2 epochs, lr encoder 1e-3, lr CF 1e-3.""",
        task="kt",
        generator=dict(n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1),
        encoder="tiny",
        options=dict(
            max_tokens=16,
            batch_size=4,
            seq_len=12,
            epochs=2,
            lr_encoder=1e-3,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
    ),
    "kt-small": Workload(
        doc="""Knowledge tracing with the real all-MiniLM-L6-v2 encoder on short texts (8-20
        words, 32 max tokens): write_kt(n_users=120, n_items=80, mean_len=30, n_unused_items=4,
        seed=0). 2,726 training interactions over 68 distinct items per epoch, batch 6 x seq
        20: 30 steps per epoch, R_batch 2.8, R_epoch 40. 2 epochs, lr encoder 5e-5, lr CF 1e-3,
        encoder chunks of 16 (a small CE batch as in the paper: the chunk, not the CF batch,
        bounds Multi-step's encoder memory).""",
        task="kt",
        generator=dict(n_users=120, n_items=80, mean_len=30, n_unused_items=4, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=32,
            batch_size=6,
            seq_len=20,
            epochs=2,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
    ),
    "news-small": Workload(
        doc="""MIND-style news recommendation (NRMS) with all-MiniLM-L6-v2 on titles (32 max
        tokens): write_mind(n_users=100, n_news=150, impressions_per_user=2, n_candidates=5,
        history_len=10, n_dev_only_news=10, seed=0); histories of 10, 4 negatives, batch 8: 26
        steps and 2,955 item occurrences over 137 distinct news per epoch. Histories and
        candidates repeat less within a batch than KT items do (R_batch 2.0, R_epoch 22): the
        workload where Single-step buys least. 2 epochs, lr encoder 5e-5, lr CF 1e-3, encoder
        chunks of 16.""",
        task="news",
        generator=dict(
            n_users=100,
            n_news=150,
            impressions_per_user=2,
            n_candidates=5,
            history_len=10,
            n_dev_only_news=10,
            seed=0,
        ),
        encoder="minilm",
        options=NEWS_OPTIONS,
    ),
    "news-medium": Workload(
        doc="""The news accuracy check: the same generator as news-small with 8 times the users
        and half of the impressions held out (the last of 2 days), so valid and test hold about
        410 impressions each where news-small has 16 and one impression moves AUC by several
        points. write_mind(n_users=800, n_news=300, impressions_per_user=2, n_candidates=5,
        history_len=10, n_dev_only_news=15, days=2, dev_days=1, seed=0); histories of 10, 4 negatives, batch 8: 115 steps and 13,345 item
        occurrences over 284 distinct news per epoch (R_batch 1.7, R_epoch 47). 2 epochs, lr
        encoder 5e-5, lr CF 1e-3, encoder chunks of 16.""",
        task="news",
        generator=dict(
            n_users=800,
            n_news=300,
            impressions_per_user=2,
            n_candidates=5,
            history_len=10,
            n_dev_only_news=15,
            days=2,
            dev_days=1,
            seed=0,
        ),
        encoder="minilm",
        options=NEWS_OPTIONS,
    ),
    "kt-skewed": Workload(
        doc="""A TOEIC-like catalogue, where Multi-step pays most: few items, many
        interactions per item, long texts. write_kt(n_users=300, n_items=100, mean_len=50,
        n_unused_items=5, zipf=1.0, seed=0), then every item text is lengthened to 64 words by
        appending words drawn (seeded per item) from its own text, so the level/topic signal
        keeps its share of the words and every item fills 64 tokens. 11,364 training
        interactions over 85 distinct items per epoch (R_epoch 134), batch 8 x seq 50: 43 steps
        per epoch, R_batch 4.4. E2E would take several minutes per epoch on 2 CPU cores, so it
        trains --e2e-steps (default 4) steps and its epoch time is extrapolated; no E2E
        accuracy. 1 epoch (--epochs 2 or more on a GPU), lr encoder 5e-5, lr CF 1e-3, encoder
        chunks of 16.""",
        task="kt",
        generator=dict(n_users=300, n_items=100, mean_len=50, n_unused_items=5, zipf=1.0, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=64,
            batch_size=8,
            seq_len=50,
            epochs=1,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
        words_per_item=64,
        e2e_steps=4,
    ),
}


# ---- inputs: data, encoder, options ---------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def lengthen_items(folder: Path, words: int, seed: int) -> None:
    """Rewrite ``items.csv`` so every text has ``words`` words, the extra ones drawn from it."""
    path = folder / "items.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out = []
    for n, (item_id, text) in enumerate(body):
        own = text.split()
        rng = random.Random(seed * 1_000_003 + n)  # per item, so the result is order-stable
        out.append([item_id, " ".join(own + [rng.choice(own) for _ in range(words - len(own))])])
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(out)


def prepare_data(name: str, workload: Workload, cache: Path) -> Path:
    """The workload's generated data folder in the cache; generated on first use."""
    from gram_scale.data import synth
    from gram_scale.data.load import generate_once

    spec = {"task": workload.task, "generator": workload.generator,
            "words_per_item": workload.words_per_item}  # fmt: skip
    folder = cache / f"bench-{name}-{_digest(spec)}"

    def write(tmp: Path) -> None:
        gen = synth.write_kt if workload.task == "kt" else synth.write_mind
        gen(tmp, **workload.generator)
        if workload.words_per_item:
            lengthen_items(tmp, workload.words_per_item, workload.generator.get("seed", 0))

    return generate_once(folder, write)


def prepare_encoder(workload: Workload, cache: Path, override: str) -> str:
    """The encoder folder: ``--encoder`` if given, else the workload's."""
    from gram_scale.encoder import default_encoder_path, make_tiny_bert

    if override:
        return override
    if workload.encoder == "tiny":
        return str(make_tiny_bert(cache / "bench-tiny-bert"))
    return default_encoder_path()


def run_options(base: Options, strategy: str, window: str | None, out_dir: Path,
                max_steps: int = 0) -> Options:  # fmt: skip
    """The options of one run: the shared ones plus strategy, window and output folder (a
    rerun of the benchmark replaces the previous one's run there)."""
    return dataclasses.replace(
        base,
        strategy=strategy,
        window=window or base.window,
        output_dir=str(out_dir),
        max_steps=max_steps,
        overwrite_output_dir=True,
    )


def to_argv(opts: Options) -> list[str]:
    """``launch/train.py`` flags for every option that differs from its default."""
    argv = []
    for f in dataclasses.fields(Options):
        value = getattr(opts, f.name)
        if value == f.default and f.name != "output_dir":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


# ---- one run --------------------------------------------------------------------------------
class RunFailed(Exception):
    """A training child process exited with an error (its log names the cause)."""


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (None without /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(opts: Options, log: Path) -> dict:
    """Train in a child process: its metrics, peak RSS, wall time, and the CPU other processes
    took meanwhile (``other_cores``: their average busy cores; timings are unreliable above 0)."""
    cmd = [sys.executable, str(TRAIN_SCRIPT), *to_argv(opts)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    busy = _busy_cpu_seconds()
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # wait4, not Popen.wait: its rusage is this child's own peak RSS
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it was reaped
    wall = time.perf_counter() - t
    other = None
    if busy is not None:
        # this process only waits, so the machine's busy time minus the child's is the others'
        others = _busy_cpu_seconds() - busy - (usage.ru_utime + usage.ru_stime)
        other = max(others, 0.0) / max(wall, 1e-9)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RunFailed(f"run failed (exit {proc.returncode}, log {log}): {' '.join(tail)}")
    metrics = json.loads((Path(opts.output_dir) / "metrics.json").read_text())
    rss = usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    return {"metrics": metrics, "rss": rss, "wall": wall, "other_cores": other,
            "dir": opts.output_dir, "argv": to_argv(opts)}  # fmt: skip


def label(strategy: str, window: str | None) -> str:
    """Row name of a run: ``e2e``, ``single``, ``multi 0.5E`` ..."""
    return strategy if window is None else f"{strategy} {window}"


def summarise(runs: list[dict], steps_per_epoch: int, extrapolated: bool) -> dict:
    """One strategy's figures from its repeats (each a ``run_child`` record).

    Per-epoch figures are totals scaled by steps per epoch / steps done, which is an exact
    division for full runs and the extrapolation for a run cut short by --max-steps."""
    first = runs[0]["metrics"]
    steps = first["steps"]
    per_epoch = steps_per_epoch / max(steps, 1)
    times = [r["metrics"]["train_seconds"] * steps_per_epoch / max(r["metrics"]["steps"], 1)
             for r in runs]  # fmt: skip
    counters = first["counters"]
    row = {
        "extrapolated": extrapolated,
        "steps": steps,
        "epochs_done": steps / steps_per_epoch,
        "time_per_epoch_s": statistics.median(times),
        "time_per_epoch_s_repeats": times,
        "occurrences_per_epoch": counters["occurrences"] * per_epoch,
        "item_forwards_per_epoch": counters["item_forwards"] * per_epoch,
        "item_backwards_per_epoch": counters["item_backwards"] * per_epoch,
        "counters": counters,
        "occurrence_unique_ratio": first["occurrence_unique_ratio"],
        "occurrences_per_backward": counters["occurrences"] / max(counters["item_backwards"], 1),
        "peak_rss_bytes": max(r["rss"] for r in runs),
        "encoder_activation_bytes": max(
            r["metrics"]["encoder_peak_activation_bytes"] for r in runs
        ),
        "cuda_peak_bytes": first.get("cuda_peak_bytes"),
        "valid": None if extrapolated else first["valid"],
        "test": None if extrapolated else first["test"],
        "curve": [] if extrapolated else [
            [e["train_seconds"], e["valid"].get(METRIC)] for e in first["epochs"]
        ],
        "runs": [{"dir": r["dir"], "argv": r["argv"], "steps": r["metrics"]["steps"],
                  "train_seconds": r["metrics"]["train_seconds"], "peak_rss_bytes": r["rss"],
                  "wall_seconds": r["wall"], "other_cores": r["other_cores"]} for r in runs],
    }  # fmt: skip
    if extrapolated:
        row["note"] = (f"extrapolated: trained {steps} steps, epoch time = time / {steps} x "
                       f"{steps_per_epoch} steps per epoch; no accuracy measured")  # fmt: skip
    return row


# ---- the epoch-time cost model, measured in-process ---------------------------------------
def _timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up: first calls allocate and build caches
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_costs(opts: Options, repeats: int = 3, cf_batches: int = 8) -> dict:
    """e (encoder forward+backward per item), f (forward only) and c (CF per interaction).

    Same code paths as training (keyed dropout, the runner's forward, the task's CF loss and
    AdamW step), on chunks of --encoder-batch-size items and on the epoch's first batches, on
    the accelerator the runs use; plain torch, without the DeepSpeed engine."""
    import itertools

    import torch

    from gram_scale.data.batches import unique_index
    from gram_scale.data.load import load_data
    from gram_scale.engine import make_accelerator
    from gram_scale.trainer import setup

    plain = dataclasses.replace(opts, config="none", report_to="none")
    s = setup(plain, load_data(plain), make_accelerator(plain, None), None)  # GPU when present
    device = s.runner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    chunk = torch.arange(min(len(s.data.catalogue), opts.encoder_batch_size))

    def fwd_bwd() -> None:
        h = s.runner.encode(chunk, salt=0, grad=True)
        (h * torch.ones_like(h)).sum().backward()
        s.encoder.zero_grad(set_to_none=True)

    def fwd() -> None:
        s.runner.encode(chunk, salt=0, grad=False)

    e = _timed(fwd_bwd, repeats, sync) / len(chunk)
    f = _timed(fwd, repeats, sync) / len(chunk)
    batches = list(itertools.islice(s.task.train_batches(0), cf_batches + 1))
    g = torch.Generator().manual_seed(0)
    table = 0.1 * torch.randn(len(s.data.catalogue), s.encoder.dim, generator=g).to(device)

    def cf_step(batch) -> None:
        local, index = unique_index(batch.items)
        s.cf.loss_and_item_grads(batch, table[local.to(device)], index)
        s.cf.step()

    cf_step(batches[0])
    per = []
    for batch in batches[1:] or batches:
        sync()
        t = time.perf_counter()
        cf_step(batch)
        sync()
        per.append((time.perf_counter() - t) / max(batch.occurrences(), 1))
    return {"e_s": e, "f_s": f, "c_s": statistics.median(per), "chunk": len(chunk),
            "tokens_per_item": s.tokens.mean_tokens()}  # fmt: skip


def cost_model(costs: dict, stats: dict) -> dict:
    """The epoch-time model: E2E N(e+c), Single (N/R_batch)e + Nc, 1E I(e+f) + Nc."""
    e, f, c = costs["e_s"], costs["f_s"], costs["c_s"]
    n, items, r_batch = stats["occurrences"], stats["distinct_items"], stats["R_batch"]
    e2e = n * (e + c)
    return {
        "bound_e_over_c": e / c,
        "predicted_single_speedup": e2e / (n / r_batch * e + n * c),
        "predicted_1E_speedup": e2e / (items * (e + f) + n * c),
    }


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


# ---- targets and Markdown -------------------------------------------------------------------
def rows_in_order(result: dict) -> list[tuple[str, dict]]:
    """``(name, row)`` per strategy in run order (results.json itself sorts its keys)."""
    rows = result["strategies"]
    return [(name, rows[name]) for name in result.get("order", rows)]


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MiB:,.1f}"


def _metric(d: dict | None) -> str:
    v = None if d is None else d.get(METRIC)
    return "n/a" if v is None or v != v else f"{v:.4f}"


def targets(result: dict) -> list[dict]:
    """The issue's targets, each ``{name, met, text}``; ``met`` is None where not measurable."""
    rows, pred = result["strategies"], result["predicted"]
    e2e, single, one_e = rows["e2e"], rows["single"], rows["multi 1E"]
    extra = " (e2e time extrapolated)" if e2e["extrapolated"] else ""
    out = []
    r_meas = single["occurrence_unique_ratio"]
    need = 0.8 * r_meas
    out.append({"name": "single speed-up >= 0.8 x measured R_batch",
                "met": single["speedup"] >= need,
                "text": f"single speed-up {single['speedup']:.2f}x vs 0.8 x R_batch "
                        f"{r_meas:.2f} = {need:.2f}x{extra}"})  # fmt: skip
    need = 0.5 * pred["R_epoch"]
    out.append({"name": "multi 1E speed-up >= 0.5 x R_epoch",
                "met": one_e["speedup"] >= need,
                "text": f"multi 1E speed-up {one_e['speedup']:.2f}x vs 0.5 x R_epoch "
                        f"{pred['R_epoch']:.1f} = {need:.1f}x{extra}"})  # fmt: skip
    if e2e["extrapolated"]:
        out.append({"name": "multi 1E test AUC within 1 point of e2e", "met": None,
                    "text": "multi 1E test AUC vs e2e: not measured, e2e was extrapolated from "
                            f"{e2e['steps']} steps and has no accuracy"})  # fmt: skip
    else:
        a, b = one_e["test"][METRIC], e2e["test"][METRIC]
        out.append({"name": "multi 1E test AUC within 1 point of e2e",
                    "met": abs(a - b) <= 0.01,
                    "text": f"multi 1E test AUC {a:.4f} vs e2e {b:.4f}: "
                            f"{100 * (a - b):+.2f} points (limit 1)"})  # fmt: skip
    key = "cuda_peak_bytes" if result["machine"]["gpu"] else "encoder_activation_bytes"
    what = "CUDA peak memory" if key == "cuda_peak_bytes" else "encoder activation memory"
    for name, row in rows_in_order(result):
        if not name.startswith("multi"):
            continue
        share = row[key] / max(e2e[key], 1)
        out.append({"name": f"{name} {what} <= 20% of e2e", "met": share <= 0.2,
                    "text": f"{name} {what} {_mib(row[key])} MiB = {100 * share:.1f}% of e2e "
                            f"{_mib(e2e[key])} MiB (limit 20%)"})  # fmt: skip
    return out


def _contention(result: dict) -> list[str]:
    """A line on the CPU that other processes took during the runs, and a warning if any."""
    seen = [(run["other_cores"], name) for name, row in rows_in_order(result)
            for run in row["runs"] if run.get("other_cores") is not None]  # fmt: skip
    if not seen:
        return []
    worst, where = max(seen)
    mean = sum(v for v, _ in seen) / len(seen)
    text = (f"Other processes on this machine used {mean:.2f} cores on average during the runs "
            f"(at most {worst:.2f}, during {where}).")  # fmt: skip
    if worst > 0.25:
        text += " Warning: the runs shared the CPU, so their timings are not reliable."
    return [text, ""]


def markdown(result: dict) -> str:
    """``results.md``: header, one table row per strategy, the targets and the bound."""
    m, stats, pred = result["machine"], result["stats"], result["predicted"]
    cuda = m["gpu"] is not None
    tokens = (
        ""
        if not stats.get("tokens_per_item")
        else f", {stats['tokens_per_item']:.1f} tokens per item"
    )
    head = ["strategy", "time / epoch (s)", "speed-up vs e2e", "encoder fwd items / epoch",
            "encoder bwd items / epoch", "occurrences / encoder bwd", "occ / unique per step",
            "peak RSS (MiB)", "encoder activations (MiB)"]  # fmt: skip
    if cuda:
        head.append("CUDA peak (MiB)")
    head += [f"valid {METRIC.upper()}", f"test {METRIC.upper()}"]
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
        f"{pred['R_epoch']:.1f}. Timed figures are the median of {result['repeats']} "
        f"repeat(s), strategies alternating; training time excludes evaluation. Whole "
        f"benchmark: {result['total_seconds']:.0f} s wall.",
        "",
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
            f"{r['item_forwards_per_epoch']:,.0f}",
            f"{r['item_backwards_per_epoch']:,.0f}",
            f"{r['occurrences_per_backward']:.2f}",
            f"{r['occurrence_unique_ratio']:.2f}",
            _mib(r["peak_rss_bytes"]),
            _mib(r["encoder_activation_bytes"]),
        ]
        if cuda:
            cells.append(_mib(r["cuda_peak_bytes"]))
        cells += [_metric(r["valid"]), _metric(r["test"])]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["strategies"].values():
        if r.get("note"):
            lines += ["", f"e2e {r['note']}."]
    lines += ["", "Targets:"]
    for t in result["targets"]:
        verdict = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        lines.append(f"- {verdict}: {t['text']}")
    b = result.get("bound")
    if b and "bound_e_over_c" in b:
        one_e = result["strategies"]["multi 1E"]["speedup"]
        single = result["strategies"]["single"]["speedup"]
        lines += [
            "",
            f"Bound (epoch-time cost model; e, f, c measured in the benchmark process on this "
            f"machine): e = {1e3 * b['e_s']:.2f} ms per item (encoder forward+backward, chunks "
            f"of {b['chunk']}), f = {1e3 * b['f_s']:.2f} ms per item (forward only), c = "
            f"{1e6 * b['c_s']:.1f} us per interaction (CF forward+backward+step). The 1E "
            f"speed-up tends to e / c = {b['bound_e_over_c']:.0f}x as R_epoch grows; for this "
            f"workload the model predicts single {b['predicted_single_speedup']:.2f}x and 1E "
            f"{b['predicted_1E_speedup']:.1f}x (measured {single:.2f}x and {one_e:.1f}x).",
        ]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, instead of argparse's usage dump
        raise InputError(None, None, f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = _Parser(prog="python -m gram_scale.bench", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--workload", required=True,
                   metavar="{" + ",".join((*WORKLOADS, LLM_WORKLOAD)) + "}",
                   help="what to train (see WORKLOADS in gram_scale/bench.py; llm-1b: "
                        "gram_scale/bench_llm.py)")  # fmt: skip
    p.add_argument("--out", default="", help="output folder; empty = outputs/bench/<workload>")
    p.add_argument("--encoder", default="", help="encoder folder instead of the workload's")
    p.add_argument("--repeats", type=int, default=1, help="runs per strategy (median timed)")
    p.add_argument("--e2e-steps", type=int, default=None, metavar="K",
                   help="e2e trains K steps and its epoch time is extrapolated (0 = full run); "
                        "default: the workload's")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="training epochs; default: workload's")
    p.add_argument("--config", default="none", metavar="PATH|none",
                   help="DeepSpeed JSON for the encoder of every run")  # fmt: skip
    p.add_argument(
        "--cache-dir", default="", help="generated data; empty = $GRAM_CACHE or ~/.cache"
    )
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the flags; the first bad one raises InputError naming it."""
    args = build_parser().parse_args(argv)
    if args.workload not in (*WORKLOADS, LLM_WORKLOAD):
        choices = ", ".join((*WORKLOADS, LLM_WORKLOAD))
        raise InputError("--workload", None, f"must be one of {choices}, got {args.workload!r}")
    if args.repeats < 1:
        raise InputError("--repeats", None, f"must be at least 1, got {args.repeats}")
    if args.e2e_steps is not None and args.e2e_steps < 0:
        raise InputError("--e2e-steps", None, f"must be 0 or more, got {args.e2e_steps}")
    if args.epochs is not None and args.epochs < 1:
        raise InputError("--epochs", None, f"must be at least 1, got {args.epochs}")
    out = Path(args.out or Path("outputs") / "bench" / args.workload)
    if out.exists() and not out.is_dir():
        raise InputError(out, None, "--out exists and is not a folder")
    args.out = out
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> dict:
    """Run the five strategies (alternating, ``args.repeats`` times) and write the outputs."""
    import torch

    from gram_scale import bench_plot
    from gram_scale.export import write_json
    from gram_scale.stats import compute

    bench_plot.check()  # fail before minutes of training, not after
    start = time.perf_counter()
    workload = WORKLOADS[args.workload]
    info = machine()
    options = dict(workload.options, task=workload.task, config=args.config, progress=False,
                   export=False, cache_dir=args.cache_dir)  # fmt: skip
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
    e2e_mode = f"extrapolated from {k} steps" if extrapolate else "full"
    _say(f"bench {args.workload}: {spe} steps/epoch, R_batch {stats['R_batch']:.2f}, "
         f"R_epoch {stats['R_epoch']:.1f}; e2e {e2e_mode}")  # fmt: skip

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    collected: dict[str, list[dict]] = {label(s, w): [] for s, w in RUNS}
    n_runs = len(RUNS) * args.repeats
    for rep in range(args.repeats):
        for strategy, window in RUNS:
            name = label(strategy, window)
            run_dir = out / "runs" / f"{name.replace(' ', '-')}-r{rep + 1}"
            steps = k if strategy == "e2e" and extrapolate else 0
            opts = validate(run_options(base, strategy, window, run_dir, steps))
            done = sum(len(v) for v in collected.values())
            _say(f"[{done + 1}/{n_runs}] {name} (repeat {rep + 1}/{args.repeats}) ...")
            run = run_child(opts, run_dir / "train.log")
            other = (
                ""
                if run["other_cores"] is None
                else f", other processes {run['other_cores']:.2f} cores"
            )
            _say(f"    {run['metrics']['train_seconds']:.1f} s training, {run['wall']:.1f} s wall, "
                 f"peak RSS {run['rss'] / MiB:,.0f} MiB{other}")  # fmt: skip
            collected[name].append(run)

    rows = {name: summarise(runs, spe, extrapolate and name == "e2e")
            for name, runs in collected.items()}  # fmt: skip
    for name, (strategy, window) in zip(rows, RUNS):
        rows[name].update(strategy=strategy, window=window)
        rows[name]["speedup"] = rows["e2e"]["time_per_epoch_s"] / rows[name]["time_per_epoch_s"]
    try:
        costs = measure_costs(dataclasses.replace(base, output_dir=str(out / "runs")))
        bound = dict(costs, **cost_model(costs, stats))
    except Exception as exc:  # the bound is optional; a failure must not lose the runs
        _say(f"warning: cost model not measured: {exc}")
        bound = {"error": str(exc)}
    stats["tokens_per_item"] = bound.get("tokens_per_item")
    result = {
        "workload": args.workload,
        "description": " ".join(workload.doc.split()),
        "command": ["python", "-m", "gram_scale.bench", *sys.argv[1:]],
        "machine": info,
        "cuda": torch.cuda.is_available(),
        "repeats": args.repeats,
        "epochs": base.epochs,
        "steps_per_epoch": spe,
        "e2e_steps": k if extrapolate else 0,
        "options": dataclasses.asdict(base),
        "stats": stats,
        "predicted": {"R_batch": stats["R_batch"], "R_epoch": stats["R_epoch"]},
        "order": list(rows),  # results.json sorts its keys; this keeps the table's row order
        "strategies": rows,
        "bound": bound,
    }
    result["targets"] = targets(result)
    result["total_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown(result))
    bench_plot.plot(result, out / "results.png")
    return result


def _terminate(signum, frame) -> None:
    # An exception, unlike the default action, lets run_child kill the run it is waiting on.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m gram_scale.bench --workload NAME [...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
        if args.workload == LLM_WORKLOAD:  # not a strategy comparison: its own module
            from gram_scale import bench_llm

            return bench_llm.run(args)
        result = bench(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    md = markdown(result)
    start = md.find("Other processes")  # the contention warning belongs with the table
    print(md[start if start >= 0 else md.index("| strategy") :], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
