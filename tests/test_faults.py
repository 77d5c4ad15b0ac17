"""Non-finite steps are skipped and bounded; a killed rank ends the run instead of hanging."""

from __future__ import annotations

import math
import time

import pytest
import torch
from launching import run
from tiny import options, params

from gram_scale.data.load import load_data
from gram_scale.trainer import setup, train


def nan_at(task, calls: set[int]):
    """Make the task's loss NaN on the given (0-based) loss calls."""
    original, count = task.loss, [0]

    def loss(batch, vecs):
        value, n = original(batch, vecs)
        hit = count[0] in calls
        count[0] += 1
        return (value * math.nan if hit else value), n

    task.loss = loss


@pytest.mark.parametrize("strategy", ["e2e", "single", "multi"])
def test_nan_step_is_skipped_and_run_continues(strategy, kt_dir, tiny_encoder):
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), strategy=strategy, window="3")
    s = setup(opts, load_data(opts))
    nan_at(s.task, {1})
    batches = s.task.train_batches(0)
    s.strategy.step(next(batches), 0)
    before = params(s)
    table = s.strategy.table.state_dict() if strategy == "multi" else None
    res = s.strategy.step(next(batches), 1)
    assert res.skipped and math.isnan(res.loss) and res.item_backwards == 0
    after = params(s)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged
    if strategy == "multi":
        now = s.strategy.table.state_dict()
        assert all(torch.equal(table[k], now[k]) for k in table)  # table and accumulator too
    res = s.strategy.step(next(batches), 2)  # the run goes on
    assert not res.skipped and math.isfinite(res.loss)
    assert any(not torch.equal(after[k], v) for k, v in params(s).items())


def test_too_many_nan_steps_stop_with_a_checkpoint(kt_dir, tiny_encoder, tmp_path, monkeypatch):
    from gram_scale.checkpoint import list_checkpoints, verify
    from gram_scale.errors import TrainingStopped
    from gram_scale.tasks.kt import KTTask

    original = KTTask.loss
    calls = [0]

    def loss(self, batch, vecs):
        value, n = original(self, batch, vecs)
        calls[0] += 1
        return (value * math.nan if calls[0] in (3, 5, 6) else value), n

    monkeypatch.setattr(KTTask, "loss", loss)
    opts = options(
        data=str(kt_dir), encoder=str(tiny_encoder), max_bad_steps=1, output_dir=str(tmp_path)
    )
    with pytest.raises(
        TrainingStopped, match="2 non-finite steps in a row.*step 5.*--max-bad-steps 1"
    ):
        train(opts)  # step 2 alone is tolerated; steps 4 and 5 in a row stop the run
    ((step, folder),) = list_checkpoints(tmp_path / "checkpoints")
    assert step == 6 and verify(folder) is None
    assert not (tmp_path / "metrics.json").exists()


def test_killed_rank_without_restart_ends_the_run(kt_dir, tiny_encoder, tmp_path):
    t = time.monotonic()
    r = run(
        [
            "--data",
            str(kt_dir),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--dist-timeout",
            "20",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ],
        processes=2,
        check=False,
        timeout=300,
        extra_env={"GRAM_FAULT_KILL": "1:3"},
    )
    elapsed = time.monotonic() - t
    assert r.returncode != 0
    assert elapsed < 20 + 30 + 40  # timeout + 30 s, plus start-up of the two processes
    out = r.stdout + r.stderr
    assert "Signal 9 (SIGKILL)" in out or "lost another process" in out, out[-3000:]
