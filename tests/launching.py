"""Run the real command line, on one process or under ``accelerate launch`` with 2 CPU ranks;
several runs can share one launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TWO_CPU = str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")
TRAIN = ROOT / "launch" / "train.py"
TRAIN_MANY = ROOT / "tests" / "train_many.py"
FAULT_TRAIN = ROOT / "tests" / "fault_train.py"  # launch/train.py with GRAM_FAULT_KILL


def tiny_run_args(kt_dir, encoder) -> list[str]:
    """The command line of a small one-epoch KT run without DeepSpeed, export or progress bar."""
    fixed = "--max-tokens 16 --batch-size 8 --seq-len 20 --epochs 1 --no-progress --no-export"
    return ["--data", str(kt_dir), "--encoder", str(encoder), *fixed.split(), "--config", "none"]


def env() -> dict:
    """Environment for child runs: offline, one thread per rank."""
    e = dict(os.environ)
    e.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
        WANDB_MODE=e.get("WANDB_MODE", "offline"),
    )
    return e


def run(
    args: list[str],
    processes: int = 1,
    timeout: int = 600,
    check: bool = True,
    extra_env=None,
    launcher_args: list[str] = (),
    script: Path = TRAIN,
):
    """``launch/train.py ARGS`` (or another script) on 1 process, or on N via accelerate launch;
    with ``GRAM_FAULT_KILL`` in ``extra_env``, the train script with its fault injection."""
    if script == TRAIN and "GRAM_FAULT_KILL" in (extra_env or {}):
        script = FAULT_TRAIN
    script = str(script)
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            TWO_CPU,
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(_free_port()),
            *launcher_args,
            script,
            *args,
        ]
    e = env()
    e.update(extra_env or {})
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def run_many(runs: list[list[str]], processes: int, timeout: int = 600) -> list[str | None]:
    """Each argument list of RUNS trained in turn by the same N launched processes (one start-up
    for all; ``tests/train_many.py``); per run, None if it finished, else its failure with the
    launch's output. The runs after a failed one are launched again without it, so a failure
    hides no other run's result. ``timeout`` is per run."""
    from train_many import FINISHED

    failures: list[str | None] = [None] * len(runs)
    todo = list(range(len(runs)))
    while todo:
        try:
            r = run(
                [json.dumps([runs[i] for i in todo])],
                processes,
                timeout * len(todo),
                check=False,
                script=TRAIN_MANY,
            )
            what, stdout, stderr = f"exit {r.returncode}", r.stdout, r.stderr
        except subprocess.TimeoutExpired as exc:
            what, stdout, stderr = f"timed out after {exc.timeout} s", exc.stdout, exc.stderr
        done = sum(FINISHED.format(k, len(todo)) in (stdout or "") for k in range(1, len(todo) + 1))
        if done == len(todo):
            break
        # the first unfinished run failed; it is reported with what the launch printed up to then
        failed, todo = todo[done], todo[done + 1 :]
        failures[failed] = (
            f"run {done + 1} of the launch failed: {what}\n"
            f"{_text(stdout)[-3000:]}\n{_text(stderr)[-6000:]}"
        )
    return failures


def _text(out: str | bytes | None) -> str:
    # a timed-out run's output comes as bytes, or not at all
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(folder: Path) -> dict[str, torch.Tensor]:
    """Every exported tensor of a run (encoder, CF model, item vectors), by prefixed name."""
    out = {}
    for prefix, f in (
        ("enc.", "encoder/model.safetensors"),
        ("cf.", "cf_model.safetensors"),
        ("vec.", "item_vectors.safetensors"),
    ):
        out.update({prefix + k: v.double() for k, v in load_file(str(Path(folder) / f)).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over tensors with the same names."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def history(folder: Path) -> list[dict]:
    """The run's per-step records (history.jsonl)."""
    from gram_scale.history import read_history

    return read_history(folder)


def metrics(folder: Path) -> dict:
    """The run's metrics.json."""
    return json.loads((Path(folder) / "metrics.json").read_text())
