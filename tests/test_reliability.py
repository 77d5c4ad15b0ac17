"""Reliability over long runs: stop signals, honest errors, safe checkpoint replacement,
resume agreement between ranks, history that does not grow in memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import fault_callbacks
from launching import ROOT, env, history, max_diff, metrics, outputs, run, tiny_run_args
from tiny import options, params

from gram_scale.checkpoint import TrainState, find_resume, list_checkpoints, save, verify
from gram_scale.data.load import load_data
from gram_scale.errors import EXIT_FAILED, EXIT_SIGUSR1, EXIT_TERMINATED, Interrupted
from gram_scale.trainer import setup, train


def common(kt_dir, encoder, out) -> list[str]:
    return [*tiny_run_args(kt_dir, encoder), "--output-dir", str(out)]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- stop signals ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, code", [("SIGTERM", EXIT_TERMINATED), ("SIGUSR1", EXIT_SIGUSR1)])
def test_stop_signal_checkpoints_and_exits_with_its_code(
    name, code, kt_dir, tiny_encoder, tmp_path
):
    out = tmp_path / "run"
    # no --save-every: --save-on-signal (the default) still leaves a checkpoint
    r = run(
        [*common(kt_dir, tiny_encoder, out), "--max-steps", "6"],
        check=False,
        extra_env={"GRAM_FAULT_KILL": f"0:2:{name}"},
    )
    assert r.returncode == code, r.stderr[-3000:]
    line = one_line(r.stderr)
    assert f"stopped by {name} after step 3" in line and "--resume latest" in line
    ((step, folder),) = list_checkpoints(out / "checkpoints")
    assert step == 3 and verify(folder) is None
    assert [h["step"] for h in history(out)] == [0, 1, 2]


def test_sigterm_without_save_on_signal_ends_the_run_at_once(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    r = run(
        [*common(kt_dir, tiny_encoder, out), "--max-steps", "6", "--no-save-on-signal"],
        check=False,
        extra_env={"GRAM_FAULT_KILL": "0:2:SIGTERM"},
    )
    assert r.returncode == -15  # the default action: killed by the signal, no checkpoint
    assert list_checkpoints(out / "checkpoints") == []


# ---- a stop signal in every phase: nothing trained is lost -----------------------------------
# Multi-step in windows of 3 over 5 steps (the last window, steps 3-4, is closed after the
# loop), evaluations after steps 2 and 4 with --save-best staging, float64: a run stopped in any
# phase and resumed must end exactly as this one does uninterrupted.
PHASES = dict(
    strategy="multi",
    window="3",
    max_steps=5,
    eval_every=2,
    save_best=True,
    export=True,
    precision="fp64",
)


def train_in_process(kt_dir, encoder, out, **kw) -> dict:
    opts = options(data=str(kt_dir), encoder=str(encoder), output_dir=str(out), **kw)
    return train(opts, fault_callbacks())  # GRAM_FAULT_KILL's, when a test sets it


@pytest.fixture(scope="module")
def uninterrupted(kt_dir, tiny_encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phases") / "full"
    train_in_process(kt_dir, tiny_encoder, out, **PHASES)
    return out


def stopped_in(phase: str, kt_dir, encoder, out, monkeypatch, capsys) -> str:
    """Run ``PHASES`` with SIGTERM sent at ``phase`` (a ``GRAM_FAULT_KILL`` WHEN); the one line
    said on stderr."""
    monkeypatch.setenv("GRAM_FAULT_KILL", f"0:{phase}:SIGTERM")
    capsys.readouterr()
    with pytest.raises(Interrupted) as stopped:
        train_in_process(kt_dir, encoder, out, **PHASES)
    monkeypatch.delenv("GRAM_FAULT_KILL")
    assert stopped.value.code == EXIT_TERMINATED and stopped.value.said
    return one_line(capsys.readouterr().err)


def assert_same_end(full: Path, out: Path) -> None:
    """The same exports, metrics and history as the uninterrupted run; no unfinished export."""
    assert max_diff(outputs(full), outputs(out)) < 1e-10
    a, b = metrics(full), metrics(out)
    for key in ("valid", "test", "steps", "counters", "best_step", "evals"):
        assert a[key] == b[key], key
    assert [h["step"] for h in history(out)] == list(range(PHASES["max_steps"]))
    assert not list(out.glob(".partial-*")) and not (out / ".best").exists()


def test_a_signal_during_a_step_stops_after_that_step(
    uninterrupted, kt_dir, tiny_encoder, tmp_path, monkeypatch, capsys
):
    """SIGTERM inside step 2 (after its collective): step 2 is the last one trained, not step 3,
    and the resumed run ends as the uninterrupted one."""
    out = tmp_path / "run"
    line = stopped_in("during-2", kt_dir, tiny_encoder, out, monkeypatch, capsys)
    assert "stopped by SIGTERM after step 3;" in line and "step-00000003" in line
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert [h["step"] for h in history(out)] == [0, 1, 2]
    train_in_process(kt_dir, tiny_encoder, out, resume="latest", **PHASES)
    assert_same_end(uninterrupted, out)


def test_a_signal_while_staging_the_best_keeps_it(
    uninterrupted, kt_dir, tiny_encoder, tmp_path, monkeypatch, capsys
):
    """SIGTERM while the best export after step 2 is staged: the staging finishes and goes into
    the step-2 checkpoint."""
    out = tmp_path / "run"
    line = stopped_in("stage-2", kt_dir, tiny_encoder, out, monkeypatch, capsys)
    assert "stopped by SIGTERM after step 2;" in line
    ((step, folder),) = list_checkpoints(out / "checkpoints")
    assert step == 2 and verify(folder) is None
    assert (folder / ".best" / "best.json").is_file()
    train_in_process(kt_dir, tiny_encoder, out, resume="latest", **PHASES)
    assert_same_end(uninterrupted, out)


def test_a_signal_in_the_final_evaluation_keeps_the_trained_state(
    uninterrupted, kt_dir, tiny_encoder, tmp_path, monkeypatch, capsys
):
    """SIGTERM in the final evaluation: a checkpoint of all 5 steps (the last window closed), no
    export; the resumed run trains nothing, evaluates and exports."""
    out = tmp_path / "run"
    line = stopped_in("eval", kt_dir, tiny_encoder, out, monkeypatch, capsys)
    assert "stopped by SIGTERM in the final evaluation, after step 5;" in line
    assert "--resume latest" in line
    ((step, folder),) = list_checkpoints(out / "checkpoints")
    assert step == 5 and verify(folder) is None and not (out / "metrics.json").exists()
    capsys.readouterr()
    train_in_process(kt_dir, tiny_encoder, out, resume="latest", **PHASES)
    assert f"resumed from {folder} at step 5" in capsys.readouterr().out
    assert_same_end(uninterrupted, out)


def test_a_signal_during_the_export_lets_it_finish(
    uninterrupted, kt_dir, tiny_encoder, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    line = stopped_in("export", kt_dir, tiny_encoder, out, monkeypatch, capsys)
    assert line == (
        f"stopped by SIGTERM during the export, after step 5; the export is complete "
        f"({out}/metrics.json)"
    )
    assert list_checkpoints(out / "checkpoints") == []  # the export holds everything
    assert_same_end(uninterrupted, out)


def test_killed_in_the_export_the_resume_tidies_up_and_only_exports(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    args = [*common(kt_dir, tiny_encoder, out), "--export", "--max-steps", "4", "--save-every", "4"]
    r = run(args, check=False, extra_env={"GRAM_FAULT_KILL": "0:export"})  # SIGKILL mid-export
    assert r.returncode == -9, r.stderr[-3000:]
    assert list(out.glob(".partial-*")) and not (out / "metrics.json").exists()
    r = run([*args, "--resume", "latest"])
    assert "at step 4" in r.stdout
    assert not list(out.glob(".partial-*"))
    assert metrics(out)["steps"] == 4 and [h["step"] for h in history(out)] == [0, 1, 2, 3]
    assert (out / "encoder" / "model.safetensors").is_file()


# ---- honest errors --------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["RuntimeError", "OOM"])
def test_a_real_failure_is_reported_as_itself(what, kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    r = run(
        [*common(kt_dir, tiny_encoder, out), "--max-steps", "4"],
        check=False,
        extra_env={"GRAM_FAULT_KILL": f"0:1:{what}"},
    )
    assert r.returncode == EXIT_FAILED, r.stderr[-3000:]
    line = one_line(r.stderr)
    log = out / "error-rank0.log"
    assert line.startswith("error: rank 0: ") and str(log) in line
    assert "lost another process" not in line
    if what == "OOM":
        assert "OutOfMemoryError: CUDA out of memory" in line and "--encoder-batch-size" in line
        assert "--gradient-checkpointing" in line
    else:
        assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in line
    assert "Traceback" in log.read_text() and "inject_fault" in log.read_text()


def test_a_failing_rank_says_what_failed_and_its_peer_that_it_was_lost(
    kt_dir, tiny_encoder, tmp_path
):
    out = tmp_path / "run"
    r = run(
        [*common(kt_dir, tiny_encoder, out), "--max-steps", "4", "--dist-timeout", "60"],
        processes=2,
        check=False,
        timeout=300,
        extra_env={"GRAM_FAULT_KILL": "1:1:RuntimeError"},
    )
    assert r.returncode != 0
    assert "error: rank 1: RuntimeError: mat1 and mat2 shapes" in r.stderr, r.stderr[-3000:]
    assert "rank 1: lost another process" not in r.stderr
    assert "Traceback" in (out / "error-rank1.log").read_text()
    assert not (out / "error-rank0.log").exists()  # rank 0 did nothing wrong


# ---- checkpoints ----------------------------------------------------------------------------
class _Accelerator:
    """Just what ``checkpoint.save`` uses, for one process; writes one file per save."""

    is_main_process, process_index = True, 0

    def __init__(self, content: bytes):
        self.content = content

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "custom_checkpoint_0.pkl").write_bytes(self.content)


class _Strategy:
    def state_dict(self):
        return {}


@pytest.mark.parametrize("crash_at", [1, 2, None])
def test_replacing_a_checkpoint_keeps_an_intact_copy_at_every_point(
    crash_at, tmp_path, monkeypatch
):
    state = TrainState(_Strategy())
    state.step = 4
    save(_Accelerator(b"old"), state, tmp_path, keep=2)
    real_replace, calls = os.replace, [0]

    def replace(src, dst):  # a crash at the n-th rename of the replacement
        calls[0] += 1
        if calls[0] == crash_at:
            raise OSError("crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        save(_Accelerator(b"new"), state, tmp_path, keep=2)
    except OSError:
        assert crash_at is not None
    monkeypatch.setattr(os, "replace", real_replace)
    folder = find_resume(tmp_path, "latest", say=lambda text: None)
    assert folder is not None and verify(folder) is None  # an intact step 4, whatever happened
    content = (folder / "custom_checkpoint_0.pkl").read_bytes()
    assert content == (b"new" if crash_at is None else b"old")
    state.step = 6  # the next save tidies up: exactly one folder per step again
    save(_Accelerator(b"next"), state, tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]


def test_ranks_agree_to_skip_a_checkpoint_one_rank_finds_corrupt(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    args = [
        *common(kt_dir, tiny_encoder, out),
        "--config",
        "ds_configs/zero2.json",
        "--save-every",
        "2",
    ]
    run([*args, "--max-steps", "4"], processes=2)
    (newest, folder), (previous, previous_folder) = list_checkpoints(out / "checkpoints")
    assert (newest, previous) == (4, 2)
    shard = next(folder.rglob("zero_pp_rank_1_*"))  # written, and checked, by rank 1 alone
    shard.write_bytes(shard.read_bytes()[:-16])
    r = run([*args, "--max-steps", "6", "--resume", "latest"], processes=2)
    assert f"checkpoint {folder} is corrupt on rank 1 ({shard.relative_to(folder)}" in r.stdout
    assert f"resumed from {previous_folder} at step 2" in r.stdout, r.stdout
    assert [h["step"] for h in history(out)] == list(range(6))
    assert metrics(out)["steps"] == 6


# ---- memory over long runs ------------------------------------------------------------------
def test_history_is_streamed_and_memory_stays_flat(tiny_encoder, tmp_path):
    from gram_scale.data.synth import write_kt

    data = tmp_path / "kt"
    write_kt(data, n_users=700, n_items=40, mean_len=70, n_unused_items=0, seed=3)
    out = tmp_path / "run"
    run(
        [
            "--data",
            str(data),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "8",
            "--batch-size",
            "1",
            "--seq-len",
            "5",
            "--epochs",
            "1",
            "--max-steps",
            "5000",
            "--freeze-encoder",
            "--strategy",
            "multi",
            "--window",
            "1E",
            "--no-progress",
            "--no-export",
            "--output-dir",
            str(out),
        ],
        timeout=900,
    )
    # (a frozen encoder's 1E window encodes the 40 items once, so the steps cost the CF model)
    records = history(out)
    assert [h["step"] for h in records] == list(range(5000))
    grown = records[4999]["rss_bytes"] - records[999]["rss_bytes"]
    assert grown < 50 * 2**20, grown
    assert "history" not in metrics(out)


# ---- non-finite encoder gradients -----------------------------------------------------------
def _nan_encoder_gradient_at(runner, calls: set[int]) -> None:
    """Make the encoder's back-propagated item gradient NaN on the given (0-based) calls."""
    backward, count = runner.backward, [0]

    def poisoned(vectors, grads, **kw):
        if count[0] in calls:
            grads = grads * float("nan")
        count[0] += 1
        return backward(vectors, grads, **kw)

    runner.backward = poisoned


@pytest.mark.parametrize("strategy", ["single", "multi"])
def test_non_finite_encoder_gradient_drops_that_update(strategy, kt_dir, tiny_encoder):
    opts = options(
        data=str(kt_dir),
        encoder=str(tiny_encoder),
        strategy=strategy,
        window="1",
        encoder_batch_size=512,
    )
    s = setup(opts, load_data(opts))
    _nan_encoder_gradient_at(s.runner, {1})  # the second step's (window's) encoder backward
    batches = s.task.train_batches(0)
    s.strategy.step(next(batches), 0)
    before = params(s)
    res = s.strategy.step(next(batches), 1)
    after = params(s)
    assert res.encoder_skipped and not res.encoder_updated
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("enc."))
    if strategy == "single":  # the whole step is dropped, the CF model too
        assert res.skipped and all(torch.equal(before[k], after[k]) for k in before)
    res = s.strategy.step(next(batches), 2)  # and training goes on
    assert res.encoder_updated and not res.encoder_skipped
    moved = params(s)
    assert all(bool(torch.isfinite(v).all()) for v in moved.values())
    assert any(not torch.equal(after[k], moved[k]) for k in after if k.startswith("enc."))


_ZERO_SKIP = """
import sys, torch
from gram_scale.config import parse_options
from gram_scale.engine import build_runner, make_accelerator, read_ds_config
from gram_scale.encoder.loading import load_encoder
opts = parse_options(["--encoder", sys.argv[1], "--config", sys.argv[2], "--lr-encoder", "1e-2"])
raw = read_ds_config(opts.config)
encoder, _ = load_encoder(opts.encoder)
from gram_scale.data.items import TokenCache
ids = (torch.arange(4).view(-1, 1) * 7 + torch.arange(8)) % 1000 + 1000
tokens = TokenCache(ids, torch.full((4,), 8), 0)  # 4 items of 8 tokens
runner = build_runner(make_accelerator(opts, raw), encoder, tokens, opts, raw)
def weights():
    from deepspeed.utils import safe_get_full_fp32_param
    return torch.cat([safe_get_full_fp32_param(p).flatten() for p in runner.engine.module.parameters()])
w0 = weights()
h = runner.encode(torch.arange(4), salt=0, grad=True)
runner.backward(h, torch.full_like(h, float("nan")))
nan_step = runner.step()
w1 = weights()
h = runner.encode(torch.arange(4), salt=1, grad=True)
runner.backward(h, torch.ones_like(h))
good_step = runner.step()
w2 = weights()
print("RESULT", nan_step, bool(torch.equal(w0, w1)), good_step, bool(torch.isfinite(w2).all()),
      bool(not torch.equal(w1, w2)))
"""


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_drops_a_non_finite_encoder_update(config, tiny_encoder):
    r = subprocess.run(
        [sys.executable, "-c", _ZERO_SKIP, str(tiny_encoder), f"ds_configs/{config}.json"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    # NaN step dropped, weights bitwise unchanged; the next step applied, finite, and moved them
    assert result == ["RESULT False True True True True"], r.stdout[-2000:]
