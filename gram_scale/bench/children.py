"""Running the benchmark's training runs, each in its own child process (``launch/train.py``),
so that peak memory and time are per run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gram_scale.bench.workloads import Run
from gram_scale.config import Options

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"
RECORD = "bench_record.json"  # beside a run's metrics.json: what the benchmark measured of it


def run_options(
    base: Options,
    run: Run,
    out_dir: Path,
    seed: int,
    max_steps: int = 0,
    multi: dict | None = None,
) -> Options:
    """The options of one run: the shared ones plus strategy, window, frozen encoder, chunk
    order, seed and output folder (a rerun of the benchmark replaces the previous one's run
    there), and for a Multi-step run the fields ``multi`` changes (--multi-options)."""
    if run.strategy == "multi" and multi:
        base = dataclasses.replace(base, **multi)
    return dataclasses.replace(
        base,
        strategy=run.strategy,
        window=run.window or base.window,
        freeze_encoder=run.frozen,
        chunk_order=run.chunk_order or base.chunk_order,
        seed=seed,
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


_LIVE: set[subprocess.Popen] = set()  # children being waited on, by any thread


def kill_children() -> None:
    """Kill every training child still running (the benchmark is being stopped)."""
    for proc in list(_LIVE):
        proc.kill()


def run_child(opts: Options, log: Path, env_extra: dict | None = None) -> dict:
    """Train in a child process: its metrics, peak RSS, wall time, and the CPU other processes
    took meanwhile (``other_cores``: their average busy cores; timings are unreliable above 0)."""
    cmd = [sys.executable, str(TRAIN_SCRIPT), *to_argv(opts)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    busy = _busy_cpu_seconds()
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _LIVE.add(proc)
        try:
            # wait4, not Popen.wait: its rusage is this child's own peak RSS
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            _LIVE.discard(proc)
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
    record = {
        "rss": rss,
        "wall": wall,
        "other_cores": other,
        "dir": opts.output_dir,
        "argv": to_argv(opts),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (Path(opts.output_dir) / RECORD).write_text(json.dumps(record))
    return dict(record, metrics=metrics)


def reuse_child(opts: Options) -> dict | None:
    """The record of an earlier benchmark's run of exactly these flags in the same folder (as
    ``run_child`` returned it, marked ``reused``), or None when there is none."""
    folder = Path(opts.output_dir)
    try:
        record = json.loads((folder / RECORD).read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("argv") != to_argv(opts):
        return None
    return dict(record, metrics=metrics, reused=True)
