"""LR schedules counted in each optimizer's own steps, and gradient clipping of both optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import options, replace

from gram_scale.data.load import load_data
from gram_scale.engine import fill_ds_config
from gram_scale.schedule import Schedule, encoder_steps, run_steps
from gram_scale.trainer import setup


def test_schedule_factors_by_hand():
    assert [Schedule("constant", 0, 4)(k) for k in range(4)] == [1.0] * 4
    assert [Schedule("constant", 2, 4)(k) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [Schedule("linear", 2, 6)(k) for k in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = [Schedule("cosine", 1, 5)(k) for k in range(5)]
    expected = [1.0] + [0.5 * (1 + math.cos(math.pi * j / 4)) for j in range(4)]
    assert cosine == pytest.approx(expected) and cosine[-1] > 0


def test_total_steps_per_optimizer():
    opts = options(epochs=3, strategy="multi", window="4", encoder_epochs=2)
    assert run_steps(opts, 10) == 30 and encoder_steps(opts, 10) == 8 * 2  # 7 windows + a tail
    assert encoder_steps(replace(opts, max_steps=8), 10) == 2 * 2
    assert encoder_steps(replace(opts, strategy="single"), 10) == 30
    assert encoder_steps(replace(opts, window="0.5E"), 10) == 6 * 2


def _lrs_per_step(opts, data, n_steps: int):
    s = setup(opts, data)
    batches = s.task.train_batches(0)
    seen = []
    for step in range(n_steps):
        seen.append((s.runner.lr(), s.cf.lr()))
        s.strategy.step(next(batches), step)
    return s, seen


def test_multi_step_encoder_schedule_counts_windows(kt_dir, tiny_encoder):
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), strategy="multi", window="2",
                   max_steps=6, lr_schedule="linear", warmup_steps=1)  # fmt: skip
    _, seen = _lrs_per_step(opts, load_data(opts), 6)
    enc = Schedule("linear", 1, 3)  # 3 windows: the encoder steps at the end of steps 1, 3, 5
    cf = Schedule("linear", 1, 6)
    assert [e for e, _ in seen] == pytest.approx([1e-3 * enc(k // 2) for k in range(6)])
    assert [c for _, c in seen] == pytest.approx([1e-3 * cf(k) for k in range(6)])


def test_max_grad_norm_clips_both_optimizers(kt_dir, tiny_encoder):
    """The gradient norm each optimizer steps with: capped with clipping, larger without."""

    def norms(max_grad_norm: float) -> dict[str, list[float]]:
        opts = options(data=str(kt_dir), encoder=str(tiny_encoder), max_grad_norm=max_grad_norm)
        s = setup(opts, load_data(opts))
        seen: dict[str, list[float]] = {"encoder": [], "cf": []}
        for name, opt in (("encoder", s.runner.optimizer), ("cf", s.cf.optimizer)):

            def before_step(opt, args, kwargs, _name=name):
                grads = [p.grad.norm() for g in opt.param_groups for p in g["params"]
                         if p.grad is not None]  # fmt: skip
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
    raw = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
           "zero_optimization": {"stage": 2}}  # fmt: skip
    assert fill_ds_config(raw, options(max_grad_norm=0.5), 2, 32)["gradient_clipping"] == 0.5
    assert fill_ds_config(raw, options(), 2, 32)["gradient_clipping"] == 0.0
