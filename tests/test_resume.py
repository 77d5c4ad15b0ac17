"""Checkpoint and resume: a 2-process run SIGKILLed mid-window and resumed equals an
uninterrupted run, LR schedules included; corrupt checkpoints are detected."""

from __future__ import annotations

import shutil

import pytest
from launching import history, max_diff, metrics, outputs, run, run_many

from gram_scale.checkpoint import TrainState, find_resume, list_checkpoints


class _Strategy:
    def __init__(self, table=None):
        self.table = table

    def state_dict(self):
        return {"table": self.table}

    def load_state_dict(self, state):
        self.table = state["table"]


def test_train_state_round_trip_restores_every_field():
    saved = TrainState(_Strategy(table=[1, 2]))
    saved.step, saved.epoch, saved.batch_in_epoch, saved.train_seconds = 7, 1, 3, 2.5
    saved.encoder_seconds = 1.5
    saved.counters["occurrences"], saved.counters["padded_forward"] = 40, 96
    saved.epochs.append({"epoch": 0, "step": 4})
    saved.skipped_steps, saved.bad_in_a_row = 2, 1
    saved.evals.append({"step": 3, "epoch": 0, "valid": {"auc": 0.5}})
    saved.best = {"step": 3, "epoch": 0, "valid": {"auc": 0.5}, "test": {"auc": 0.6}}
    state = saved.state_dict()
    saved.counters["occurrences"] += 1  # the saved state is a copy, not a view
    saved.epochs.append({"epoch": 1, "step": 8})

    restored = TrainState(_Strategy())
    restored.load_state_dict(state)
    older = TrainState(_Strategy())  # a checkpoint from before the token counters
    older.load_state_dict(
        {
            **state,
            "counters": {"occurrences": 40, "unique": 1, "item_forwards": 2, "item_backwards": 3},
        }
    )
    assert older.counters == {
        **restored.counters,
        "padded_forward": 0,
        "unique": 1,
        "item_forwards": 2,
        "item_backwards": 3,
    }
    assert restored.strategy.table == [1, 2]
    assert {k: getattr(restored, k) for k in vars(restored) if k != "strategy"} == {
        "step": 7,
        "epoch": 1,
        "batch_in_epoch": 3,
        "train_seconds": 2.5,
        "encoder_seconds": 1.5,
        "counters": {
            "occurrences": 40,
            "unique": 0,
            "item_forwards": 0,
            "item_backwards": 0,
            "tokens_forward": 0,
            "padded_forward": 96,
            "tokens_backward": 0,
            "padded_backward": 0,
            "attention_pairs_forward": 0,
            "attention_pairs_backward": 0,
        },
        "epochs": [{"epoch": 0, "step": 4}],
        "skipped_steps": 2,
        "bad_in_a_row": 1,
        "evals": [{"step": 3, "epoch": 0, "valid": {"auc": 0.5}}],
        "best": {"step": 3, "epoch": 0, "valid": {"auc": 0.5}, "test": {"auc": 0.6}},
    }


# run name -> strategy flags; multi-adam: table rows moved by per-row Adam, whose state a
# checkpoint mid-window must carry
STRATEGIES = {
    "single": ["--strategy", "single"],
    "multi": ["--strategy", "multi"],
    "multi-adam": ["--strategy", "multi", "--table-optimizer", "adam", "--table-lr", "0.05"],
}


def args(kt_dir, tiny_encoder, strategy: str, out) -> list[str]:
    return [
        "--data",
        str(kt_dir),
        "--encoder",
        str(tiny_encoder),
        "--max-tokens",
        "16",
        "--epochs",
        "2",
        "--max-steps",
        "9",
        "--batch-size",
        "8",
        "--seq-len",
        "20",
        *STRATEGIES[strategy],
        "--window",
        "3",
        "--save-every",
        "2",
        "--cf-dropout",
        "0.1",
        # warmup then cosine decay: the resumed run must go on from the saved LR position
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "3",
        "--max-grad-norm",
        "1.0",
        "--config",
        "ds_configs/zero2.json",
        "--precision",
        "fp64",
        "--no-progress",
        "--output-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def uninterrupted(kt_dir, tiny_encoder, tmp_path_factory):
    """Uninterrupted 2-process runs of each strategy, the reference for every resumed run:
    ``{strategy: (output folder, failure or None)}``, both trained in one launch."""
    out = {s: tmp_path_factory.mktemp(f"full-{s}") for s in STRATEGIES}
    failures = run_many([args(kt_dir, tiny_encoder, s, folder) for s, folder in out.items()], 2)
    return {s: (folder, failure) for (s, folder), failure in zip(out.items(), failures)}


def reference(uninterrupted, strategy: str):
    """The uninterrupted run's folder; its failure fails the test that needs it."""
    folder, failure = uninterrupted[strategy]
    assert failure is None, f"uninterrupted {strategy} run: {failure}"
    return folder


# A resumed run repeats the uninterrupted run's operations in the same order, in float64; a
# restored state that is off by 1e-3 in one item's row moves results by >= 1e-7 (guard below).
RESUME_TOL = 1e-10


def assert_same_run(a_dir, b_dir):
    assert max_diff(outputs(a_dir), outputs(b_dir)) < RESUME_TOL
    a, b = metrics(a_dir), metrics(b_dir)
    assert a["test"] == b["test"] and a["valid"] == b["valid"] and a["counters"] == b["counters"]
    assert [h["loss"] for h in history(a_dir)] == pytest.approx(
        [h["loss"] for h in history(b_dir)], abs=1e-6
    )
    assert [h["step"] for h in history(b_dir)] == list(range(metrics(b_dir)["steps"]))
    lrs = [(h["lr_encoder"], h["lr_cf"]) for h in history(a_dir)]
    assert lrs == [(h["lr_encoder"], h["lr_cf"]) for h in history(b_dir)]
    assert len(set(lrs)) > 2  # the schedule really moved the rates


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_elastic_restart_after_sigkill_equals_uninterrupted(
    strategy, uninterrupted, kt_dir, tiny_encoder, tmp_path
):
    out = tmp_path / "elastic"
    r = run(
        [*args(kt_dir, tiny_encoder, strategy, out), "--resume", "latest"],
        processes=2,
        extra_env={"GRAM_FAULT_KILL": "1:5"},
        launcher_args=["--max_restarts", "2"],
    )
    assert "starting from scratch" in r.stdout  # first attempt: nothing to resume yet
    assert "resumed from" in r.stdout and "step-00000004" in r.stdout  # after the restart
    assert_same_run(reference(uninterrupted, strategy), out)


def test_sigterm_mid_window_then_resume_equals_uninterrupted(
    uninterrupted, kt_dir, tiny_encoder, tmp_path
):
    """A preemption: SIGTERM reaches one rank before step 4 (window 3..5); every rank finishes
    step 4, a checkpoint of 5 steps is written, and a resumed run ends equal to the
    uninterrupted one."""
    out = tmp_path / "preempted"
    full = args(kt_dir, tiny_encoder, "multi", out)
    r = run(full, processes=2, check=False, extra_env={"GRAM_FAULT_KILL": "1:4:SIGTERM"})
    assert r.returncode != 0  # 143 from each rank; the launcher reports it as a failure
    assert "stopped by SIGTERM on another process after step 5" in r.stderr, r.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [5, 4]
    r = run([*full, "--resume", "latest"], processes=2)
    assert "step-00000005 at step 5" in r.stdout
    assert_same_run(reference(uninterrupted, "multi"), out)


def test_corrupt_latest_checkpoint_falls_back_to_previous(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    one = [
        *args(kt_dir, tiny_encoder, "single", out),
        "--config",
        "none",
        "--lr-schedule",
        "constant",
    ]  # the last of a repeated flag wins
    run([*one, "--max-steps", "4"])
    (newest, folder), (prev, prev_folder) = list_checkpoints(out / "checkpoints")[:2]
    assert (newest, prev) == (4, 2)
    victim = max(
        (p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"),
        key=lambda p: p.stat().st_size,
    )
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncate
    said = []
    assert find_resume(out, "latest", say=said.append) == prev_folder
    assert len(said) == 1 and "corrupt" in said[0] and victim.name in said[0]
    r = run([*one, "--max-steps", "6", "--resume", "latest"])
    assert "is corrupt" in r.stdout and "resumed from" in r.stdout and "step-00000002" in r.stdout
    # plain torch schedulers resume at the saved position (warmup 3: 1/3, 2/3, then 1; the
    # constant schedule does not depend on --max-steps, which the two runs change)
    records = history(out)
    factors = [1 / 3, 2 / 3, 1, 1, 1, 1]
    assert [h["lr_encoder"] for h in records] == pytest.approx([5e-5 * f for f in factors])
    assert [h["lr_cf"] for h in records] == pytest.approx([1e-3 * f for f in factors])


def test_resume_restores_the_window_table_exactly(kt_dir, tiny_encoder, tmp_path):
    """1 process, Multi-step: resumed mid-window equals uninterrupted; the same comparison fails
    when the restored item table is off by 1e-3 in one row's gradient sum (guard)."""
    import torch

    from gram_scale.checkpoint import write_manifest

    one = [*args(kt_dir, tiny_encoder, "multi", tmp_path), "--config", "none"]  # last one wins
    full, cut, skewed = tmp_path / "full", tmp_path / "cut", tmp_path / "skewed"
    run([*one, "--output-dir", str(full)])
    # stopped (SIGTERM, not a smaller --max-steps: the cosine schedule spans the whole run)
    # with 4 steps done, inside window 3..5
    r = run(
        [*one, "--output-dir", str(cut)], check=False, extra_env={"GRAM_FAULT_KILL": "0:3:SIGTERM"}
    )
    assert r.returncode == 128 + 15, r.stderr[-3000:]
    checkpoint = cut / "checkpoints" / "step-00000004"
    shutil.copytree(cut, skewed)
    run([*one, "--output-dir", str(cut), "--resume", "latest"])
    assert_same_run(full, cut)

    # the registered object whose state holds the strategy's: the TrainState
    saved = sorted((skewed / "checkpoints" / checkpoint.name).glob("custom_checkpoint_*.pkl"))
    loaded = {f: torch.load(f, weights_only=False) for f in saved}
    ((state_file, state),) = [(f, v) for f, v in loaded.items() if "strategy" in v]
    table = state["strategy"]["table"]
    assert len(table["items"]) > 0 and float(table["grads"][0].abs().max()) > 0
    table["grads"][0] *= 1 + 1e-3
    torch.save(state, state_file)
    write_manifest(state_file.parent)
    run([*one, "--output-dir", str(skewed), "--resume", "latest"])
    assert max_diff(outputs(full), outputs(skewed)) > 100 * RESUME_TOL
