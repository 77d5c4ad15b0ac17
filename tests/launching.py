"""Run the real command line, on one process or under ``accelerate launch`` with 2 CPU ranks."""

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


def env() -> dict:
    """Environment for child runs: offline, one thread per rank, a persistent extension cache."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(ROOT), WANDB_MODE=e.get("WANDB_MODE", "offline"),
             TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))  # fmt: skip
    return e


def run(args: list[str], processes: int = 1, timeout: int = 600, check: bool = True, extra_env=None,
        launcher_args: list[str] = ()):  # fmt: skip
    """``launch/train.py ARGS`` on 1 process, or on N via accelerate launch."""
    script = str(ROOT / "launch" / "train.py")
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [ACCELERATE, "launch", "--config_file", TWO_CPU, "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), *launcher_args, script, *args]  # fmt: skip
    e = env()
    e.update(extra_env or {})
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(folder: Path) -> dict[str, torch.Tensor]:
    """Every exported tensor of a run (encoder, CF model, item vectors), by prefixed name."""
    out = {}
    for prefix, f in (("enc.", "encoder/model.safetensors"), ("cf.", "cf_model.safetensors"),
                      ("vec.", "item_vectors.safetensors")):  # fmt: skip
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
