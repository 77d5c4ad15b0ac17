"""``gram_scale.stats`` against numbers computed by hand on a small file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stats_match_hand_computed(tmp_path):
    # 2 users (both in train: no valid/test/cold), sequences of 5 and 3 interactions
    (tmp_path / "items.csv").write_text("item_id,text\na,alpha\nb,beta\nc,gamma\nd,delta\n")
    rows = ["u1,a,1", "u1,b,0", "u1,a,1", "u1,a,0", "u1,c,1", "u2,b,1", "u2,b,0", "u2,c,1"]
    (tmp_path / "interactions.csv").write_text("user_id,item_id,correct\n" + "\n".join(rows) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gram_scale.stats",
            "--task",
            "kt",
            "--data",
            str(tmp_path),
            "--batch-size",
            "2",
            "--seq-len",
            "3",
            "--valid-frac",
            "0",
            "--test-frac",
            "0",
            "--cold-frac",
            "0",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    # windows of 3: [a b a], [a c], [b b c] -> 3 windows, batches of 2 -> 2 batches
    # the two batches hold 5 and 3 occurrences (which windows pair up depends on the shuffle)
    assert s["interactions"] == 8 and s["occurrences"] == 8 and s["batches"] == 2
    assert s["items"] == 4 and s["distinct_items"] == 3 and s["cold_items"] == 1  # d never seen
    assert abs(s["R_epoch"] - 8 / 3) < 1e-9
    assert abs(s["occurrences_per_batch"] - 4.0) < 1e-9
    # possible pairings: {aba, ac}+{bbc} -> uniques 3+2; {aba, bbc}+{ac} -> 3+2; {ac, bbc}+{aba} -> 3+2
    assert abs(s["unique_per_batch"] - 2.5) < 1e-9
    assert abs(s["R_batch"] - 8 / 5) < 1e-9


def test_stats_bad_flag_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "gram_scale.stats", "--batch-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--batch-size: must be at least 1" in r.stderr


def test_world_traffic_prediction_matches_a_slice_by_slice_count(kt_dir):
    """``--world``'s exchange bytes against counting each rank's slice directly; the all-gather
    column is 3 x U x D x bytes per step."""
    import torch
    from tiny import options

    from gram_scale.data.load import load_data
    from gram_scale.exchange import owner_of
    from gram_scale.stats import traffic
    from gram_scale.tasks import make_task

    opts = options(data=str(kt_dir), batch_size=7)
    task = make_task(opts, load_data(opts), dim=8)
    world, dim, elem = 3, 16, 4
    got = traffic(task, world, dim, elem)
    per_rank_steps, union, steps = [], 0.0, 0
    for batch in task.train_batches(0):
        mine = [torch.unique(batch.slice(r, world).items) for r in range(world)]
        mine = [m[m >= 0] for m in mine]
        for r in range(world):
            asked = int((owner_of(mine[r], world) != r).sum())
            served = sum(int((owner_of(mine[a], world) == r).sum()) for a in range(world) if a != r)
            per_rank_steps.append((asked + served) * (8 + 2 * dim * elem))
        union += 3 * len(torch.unique(batch.items[batch.items >= 0])) * dim * elem
        steps += 1
    assert (
        abs(got["exchange_bytes_per_rank_step"] - sum(per_rank_steps) / len(per_rank_steps)) < 1e-6
    )
    assert got["exchange_max_bytes_rank_step"] == max(per_rank_steps)
    assert abs(got["allgather_bytes_per_rank_step"] - union / steps) < 1e-6


def test_world_flag_prints_the_table(tmp_path, kt_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gram_scale.stats",
            "--task",
            "kt",
            "--data",
            str(kt_dir),
            "--batch-size",
            "8",
            "--world",
            "2,4",
            "--dim",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index("item traffic per rank per step (D = 32, fp32):")
    assert lines[at + 2].split()[0] == "2" and lines[at + 3].split()[0] == "4"
