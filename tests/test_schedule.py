"""LR schedules counted in each optimizer's own steps, and gradient clipping of both optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import options, replace

from gram_scale.data.load import load_data
from gram_scale.engine import fill_ds_config
from gram_scale.schedule import Schedule, run_steps
from gram_scale.strategies.multi import window_encoder_steps as encoder_steps
from gram_scale.strategies.single import SingleStep
from gram_scale.trainer import setup


def test_schedule_factors_by_hand():
    assert [Schedule("constant", 0, 4)(k) for k in range(4)] == [1.0] * 4
    assert [Schedule("constant", 2, 4)(k) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [Schedule("linear", 2, 6)(k) for k in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = [Schedule("cosine", 1, 5)(k) for k in range(5)]
    expected = [1.0] + [0.5 * (1 + math.cos(math.pi * j / 4)) for j in range(4)]
    assert cosine == pytest.approx(expected) and cosine[-1] > 0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_steps_past_the_total_keep_the_last_rate(kind):
    """Multi-step's encoder step count is an estimate: a run that takes more steps than it
    said goes on at the last step's (small, positive) rate."""
    schedule = Schedule(kind, 1, 5)
    assert [schedule(k) for k in range(5, 9)] == [schedule(4)] * 4 and schedule(4) > 0


def test_total_steps_per_optimizer():
    """30 CF steps in windows of 4 (7 windows and a 2-step tail), 2 regression passes; every
    window updates the encoder (--last-window update)."""
    opts = options(epochs=3, strategy="multi", window="4", encoder_epochs=2, last_window="update")
    assert run_steps(opts, 10) == 30
    assert SingleStep.encoder_steps(replace(opts, strategy="single"), 10, None) == 30
    # auto: 60 items in mini-batches of max(16, 60 / 4): 4 per window, 2 in the 2-step tail
    assert encoder_steps(opts, 10, 60, 50) == 30 * 2
    assert encoder_steps(replace(opts, max_steps=8), 10, 60, 50) == 8 * 2
    # 5-step windows: 60 items / 5 steps = 12 a mini-batch, raised to 16: 4 per window
    assert encoder_steps(replace(opts, window="0.5E"), 10, 60, 50) == 6 * 4 * 2
    # a 3-item catalogue: one mini-batch per window (auto holds at least 16 items)
    assert encoder_steps(opts, 10, 3, 50) == (7 + 1) * 2
    # 25 items a mini-batch: a window touches at most 4 x 50 items (8 mini-batches), the tail 100
    assert encoder_steps(replace(opts, regress_batch_size="25"), 10, 1000, 50) == (7 * 8 + 4) * 2
    # a mini-batch that holds every touched item: one step per window and pass
    assert encoder_steps(replace(opts, regress_batch_size="100000"), 10, 1000, 50) == 8 * 2
    # --last-window cf: the run's last window (the tail, or a full one) makes none; a run of
    # one window keeps its update
    cf = replace(opts, last_window="cf")
    assert encoder_steps(cf, 10, 60, 50) == (30 - 2) * 2
    assert encoder_steps(replace(cf, max_steps=8), 10, 60, 50) == 4 * 2
    assert encoder_steps(replace(cf, max_steps=4), 10, 60, 50) == 4 * 2


def _lrs_per_step(opts, data, n_steps: int):
    s = setup(opts, data)
    batches = s.task.train_batches(0)
    seen = []
    for step in range(n_steps):
        seen.append((s.runner.lr(), s.cf.lr()))
        s.strategy.step(next(batches), step)
    return s, seen


def test_multi_step_encoder_schedule_counts_windows(kt_dir, tiny_encoder):
    """One mini-batch per window: the encoder steps at the end of steps 1, 3, 5."""
    opts = options(
        data=str(kt_dir),
        encoder=str(tiny_encoder),
        strategy="multi",
        window="2",
        max_steps=6,
        lr_schedule="linear",
        warmup_steps=1,
        regress_batch_size="100000",
        last_window="update",
    )
    _, seen = _lrs_per_step(opts, load_data(opts), 6)
    enc = Schedule("linear", 1, 3)
    cf = Schedule("linear", 1, 6)
    assert [e for e, _ in seen] == pytest.approx([1e-3 * enc(k // 2) for k in range(6)])
    assert [c for _, c in seen] == pytest.approx([1e-3 * cf(k) for k in range(6)])


def test_multi_step_encoder_schedule_counts_mini_batches(kt_dir, tiny_encoder):
    """Auto mini-batches: 7 steps in windows of 3 make 3 + 3 + 1 encoder steps under
    --last-window update (each window touches more items than it has steps), as estimated, so
    the linear decay ends on the last one; the encoder's rate at each window start is the
    schedule's after the steps so far. Under --last-window cf the tail makes none: 6, as
    estimated."""
    opts = options(
        data=str(kt_dir),
        encoder=str(tiny_encoder),
        strategy="multi",
        window="3",
        max_steps=7,
        lr_schedule="linear",
        warmup_steps=2,
        last_window="update",
    )
    s, seen = _lrs_per_step(opts, load_data(opts), 7)
    assert s.runner.scheduler.last_epoch == 6  # 2 windows so far; the tail waits for finish
    s.strategy.finish(7)
    enc = Schedule("linear", 2, 7)
    assert [e for e, _ in seen] == pytest.approx([1e-3 * enc(k // 3 * 3) for k in range(7)])
    assert s.runner.scheduler.last_epoch == 7
    assert s.runner.lr() == pytest.approx(1e-3 * enc(6))  # the last step's rate, kept

    s, seen = _lrs_per_step(replace(opts, last_window="cf"), load_data(opts), 7)
    s.strategy.finish(7)
    enc = Schedule("linear", 2, 6)
    assert [e for e, _ in seen] == pytest.approx([1e-3 * enc(k // 3 * 3) for k in range(7)])
    assert s.runner.scheduler.last_epoch == 6


def test_max_grad_norm_clips_both_optimizers(kt_dir, tiny_encoder):
    """The gradient norm each optimizer steps with: capped with clipping, larger without."""

    def norms(max_grad_norm: float) -> dict[str, list[float]]:
        opts = options(data=str(kt_dir), encoder=str(tiny_encoder), max_grad_norm=max_grad_norm)
        s = setup(opts, load_data(opts))
        seen: dict[str, list[float]] = {"encoder": [], "cf": []}
        for name, opt in (("encoder", s.runner.optimizer), ("cf", s.cf.optimizer)):

            def before_step(opt, args, kwargs, _name=name):
                grads = [
                    p.grad.norm()
                    for g in opt.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
                seen[_name].append(float(torch.stack(grads).norm()))

            opt.register_step_pre_hook(before_step)
        batches = s.task.train_batches(0)
        for k in range(2):
            s.strategy.step(next(batches), k)
        return seen

    free, clipped = norms(0.0), norms(1e-3)
    for name in ("encoder", "cf"):
        assert min(free[name]) > 1e-2, name
        assert max(clipped[name]) == pytest.approx(1e-3, rel=1e-3), name


def test_deepspeed_config_takes_the_clipping_flag():
    raw = {
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 2},
    }
    assert fill_ds_config(raw, options(max_grad_norm=0.5), 2, 32)["gradient_clipping"] == 0.5
    assert fill_ds_config(raw, options(), 2, 32)["gradient_clipping"] == 0.0
