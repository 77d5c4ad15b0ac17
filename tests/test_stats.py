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
        [sys.executable, "-m", "gram_scale.stats", "--task", "kt", "--data", str(tmp_path),
         "--batch-size", "2", "--seq-len", "3", "--valid-frac", "0", "--test-frac", "0",
         "--cold-frac", "0", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
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
    r = subprocess.run([sys.executable, "-m", "gram_scale.stats", "--batch-size", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--batch-size: must be at least 1" in r.stderr
