"""Soak test of elastic restarts: a 2-rank run loses a random rank every few steps, 5 times,
restarts under ``accelerate launch --max_restarts 5``, and must end equal to an uninterrupted
run. Generates its own tiny data and encoder; prints each kill and the comparison.

    python launch/soak.py [--seed 0] [--kills 5] [--every 3]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(args: list[str], env: dict, restarts: int) -> subprocess.CompletedProcess:
    """``launch/train.py ARGS`` on 2 CPU ranks with elastic restarts, with the tests' fault
    injection (``GRAM_FAULT_KILL``, ``tests/faults.py``) installed."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        _port(),
        "--max_restarts",
        str(restarts),
        str(ROOT / "tests/fault_train.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def main() -> int:
    """Run the soak; exit 0 when the restarted run equals the uninterrupted one."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--every", type=int, default=3, help="steps between kills (at most)")
    a = p.parse_args()
    from gram_scale.bench.tiny import make_tiny_bert
    from gram_scale.data.synth import write_kt
    from gram_scale.history import read_history
    from tests.launching import max_diff, metrics, outputs

    work = Path(tempfile.mkdtemp(prefix="gram-soak-"))
    write_kt(work / "kt", n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1)
    encoder = make_tiny_bert(work / "enc")
    rng = random.Random(a.seed)
    kills, step = [], 0
    for _ in range(a.kills):  # save every 2 steps: each restart loses at most one step
        step += rng.randint(2, a.every)
        kills.append((rng.randrange(2), step))
    total = step + 3
    common = [
        "--data",
        str(work / "kt"),
        "--encoder",
        str(encoder),
        "--max-tokens",
        "16",
        "--epochs",
        "3",
        "--max-steps",
        str(total),
        "--batch-size",
        "8",
        "--seq-len",
        "20",
        "--strategy",
        "multi",
        "--window",
        "3",
        "--save-every",
        "2",
        "--cf-dropout",
        "0.1",
        "--config",
        "ds_configs/zero2.json",
        "--precision",
        "fp64",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    t = time.perf_counter()
    r = launch([*common, "--output-dir", str(work / "full")], env, 0)
    if r.returncode:
        print(r.stderr[-3000:])
        return 1
    print(f"uninterrupted: {total} steps in {time.perf_counter() - t:.0f} s")
    spec = ",".join(f"{rank}:{s}" for rank, s in kills)
    print("kills (rank before step):", ", ".join(f"rank {rank} @ {s}" for rank, s in kills))
    t = time.perf_counter()
    r = launch(
        [*common, "--output-dir", str(work / "soak"), "--resume", "latest"],
        dict(env, GRAM_FAULT_KILL=spec),
        a.kills,
    )
    seconds = time.perf_counter() - t
    resumes = [line for line in r.stdout.splitlines() if line.startswith("resumed from")]
    print(f"restarted run: exit {r.returncode} in {seconds:.0f} s; {len(resumes)} resumes:")
    for line in resumes:
        print("  " + line.replace(str(work), "..."))
    if r.returncode:
        print(r.stderr[-3000:])
        return 1
    diff = max_diff(outputs(work / "full"), outputs(work / "soak"))
    same = metrics(work / "full")["test"] == metrics(work / "soak")["test"]
    steps = [h["step"] for h in read_history(work / "soak")] == list(range(total))
    ok = diff < 1e-10 and same and steps and len(resumes) == a.kills
    print(
        f"max abs difference of every exported tensor: {diff:.3g} (limit 1e-10); test metrics "
        f"identical: {same}; history steps 0..{total - 1} once each: {steps}"
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
