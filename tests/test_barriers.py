"""The trainer's Accelerator on several CPU processes makes every rank wait at its barriers,
with and without DeepSpeed: without a DeepSpeed config accelerate used to take the ranks for
single processes, so ``wait_for_everyone`` returned at once and the main process could rename a
checkpoint folder another rank was still writing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from launching import run

PROBE = Path(__file__).with_name("barrier_probe.py")


@pytest.mark.parametrize("config", ["none", "zero2"])
def test_barriers_wait_on_cpu_ranks(config):
    r = run([config], processes=2, script=PROBE)
    found = dict(
        (int(m[1]), (float(m[2]), float(m[3])))
        for m in re.finditer(r"rank (\d) \S+ barrier ([\d.]+) first ([\d.]+)", r.stdout)
    )
    assert set(found) == {0, 1}, r.stdout
    # rank 0 waited for the late rank 1 at the barrier; rank 1 for rank 0 in main_process_first
    assert found[0][0] >= 1.0, found
    assert found[1][1] >= 1.0, found
