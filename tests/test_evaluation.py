"""--eval-every evaluates on the valid split at the right steps without changing training;
--save-best exports the best evaluation's models and vectors, names its step, and a resumed run
picks the same best as an uninterrupted one."""

from __future__ import annotations

import json
import signal

import pytest
from faults import fault_callbacks
from launching import max_diff, metrics, outputs
from tiny import fake_valid_auc as fake_auc
from tiny import options

from gram_scale.errors import Interrupted
from gram_scale.history import read_history
from gram_scale.trainer import train


def run(kt_dir, tiny_encoder, out, **kw) -> dict:
    opts = options(
        data=str(kt_dir), encoder=str(tiny_encoder), precision="fp64", output_dir=str(out), **kw
    )
    return train(opts, fault_callbacks())  # GRAM_FAULT_KILL's, when a test sets it


@pytest.mark.parametrize("strategy", ["single", "multi"])
def test_eval_every_evaluates_at_its_steps_and_changes_nothing(
    strategy, kt_dir, tiny_encoder, tmp_path
):
    """Evaluations after steps 2, 4 and 6 of 7 (the 7th's is the final one), in metrics.json and
    in those steps' history lines; the one after step 4 equals the final evaluation of a run
    stopped there, and the 7-step run ends as it does without evaluations (under Multi-step the
    step-2 and step-4 evaluations fall inside windows of 3)."""
    kw = dict(strategy=strategy, window="3")
    m = run(kt_dir, tiny_encoder, tmp_path / "every", max_steps=7, eval_every=2, **kw)
    assert [e["step"] for e in m["evals"]] == [2, 4, 6]
    assert metrics(tmp_path / "every")["evals"] == m["evals"]
    history = read_history(tmp_path / "every")
    assert [h["step"] + 1 for h in history if "valid" in h] == [2, 4, 6]
    assert [h["valid"] for h in history if "valid" in h] == [e["valid"] for e in m["evals"]]
    plain = run(kt_dir, tiny_encoder, tmp_path / "plain", max_steps=7, **kw)
    assert "evals" not in plain
    assert m["valid"] == plain["valid"] and m["test"] == plain["test"]
    if strategy == "single":  # Multi-step's run of 4 steps would close its window early
        four = run(kt_dir, tiny_encoder, tmp_path / "four", max_steps=4, **kw)
        assert m["evals"][1]["valid"] == four["valid"]
    seen = [e["valid"] for e in m["evals"]] + [m["valid"]]
    assert len({tuple(sorted(v.items())) for v in seen}) == 4  # the model moved in between


# valid AUC by the number of steps trained when evaluated: the best is after step 4
FAKE_AUC = {2: 0.6, 4: 0.9, 6: 0.7}


@pytest.fixture
def fake_valid_auc(monkeypatch):
    """Valid AUC replaced by ``FAKE_AUC`` of the steps trained so far (test metrics stay real)."""
    fake_auc(monkeypatch, FAKE_AUC)


def test_save_best_exports_the_best_step(fake_valid_auc, kt_dir, tiny_encoder, tmp_path):
    """Evaluations after steps 2, 4 and 6 (the final one) score 0.6, 0.9, 0.7: the export is the
    model after step 4, equal to a run stopped there, and metrics.json says so."""
    best = tmp_path / "best"
    m = run(kt_dir, tiny_encoder, best, max_steps=6, eval_every=2, save_best=True, export=True)
    assert m["best_step"] == 4 and m["best_valid"] == 0.9 and m["valid"]["auc"] == 0.9
    assert m["last_valid"]["auc"] == 0.7 and m["steps"] == 6
    four = run(kt_dir, tiny_encoder, tmp_path / "four", max_steps=4, export=True)
    assert m["test"] == four["test"]  # the exported model's test metrics
    assert {k: v for k, v in m["valid"].items() if k != "auc"} == {
        k: v for k, v in four["valid"].items() if k != "auc"
    }
    assert max_diff(outputs(best), outputs(tmp_path / "four")) < 1e-12
    last = run(kt_dir, tiny_encoder, tmp_path / "last", max_steps=6, eval_every=2, export=True)
    assert max_diff(outputs(best), outputs(tmp_path / "last")) > 1e-6  # step 6's is not step 4's
    assert m["last_test"] == last["test"]
    assert sorted(p.name for p in best.iterdir() if p.name.startswith(".")) == []  # no staging


def test_save_best_survives_a_resume(fake_valid_auc, kt_dir, tiny_encoder, tmp_path, monkeypatch):
    """Stopped by SIGTERM after step 4 (the best), resumed to step 6: the same best export and
    metrics as an uninterrupted run; the best travelled in the checkpoint."""
    kw = dict(max_steps=6, eval_every=2, save_best=True, export=True, save_every=3)
    full = run(kt_dir, tiny_encoder, tmp_path / "full", **kw)
    cut = tmp_path / "cut"
    monkeypatch.setenv("GRAM_FAULT_KILL", "0:3:SIGTERM")  # arrives before step 3 (0-based)
    with pytest.raises(Interrupted) as stopped:
        run(kt_dir, tiny_encoder, cut, **kw)
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.delenv("GRAM_FAULT_KILL")
    kept = {
        step: json.loads(
            (cut / "checkpoints" / f"step-{step:08d}" / ".best" / "best.json").read_text()
        )["step"]
        for step in (3, 4)
    }
    assert kept == {3: 2, 4: 4}  # each checkpoint holds the best as of its step
    resumed = run(kt_dir, tiny_encoder, cut, resume="latest", **kw)
    assert resumed["best_step"] == full["best_step"] == 4
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    assert max_diff(outputs(tmp_path / "full"), outputs(cut)) < 1e-12
