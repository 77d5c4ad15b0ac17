"""GRAM Single-step equals E2E; Multi-step with a 1-step window equals Single-step."""

from __future__ import annotations

import pytest
from tiny import max_diff, options, params, replace

from gram_scale.data.load import load_data
from gram_scale.trainer import setup

TOL = 1e-5


def run_steps(opts, data, n_steps: int):
    """Train ``n_steps`` steps in-process; return the session and the per-step results."""
    s = setup(opts, data)
    results = []
    batches = s.task.train_batches(0)
    for step in range(n_steps):
        results.append(s.strategy.step(next(batches), step))
    return s, results


@pytest.fixture(params=["kt", "news"])
def task_opts(request, tiny_encoder, tiny_encoder_nodrop, kt_dir, news_dir):
    data_dir = kt_dir if request.param == "kt" else news_dir
    opts = options(task=request.param, data=str(data_dir), encoder=str(tiny_encoder))
    return opts, load_data(opts), str(tiny_encoder_nodrop)


def with_dropout(opts, nodrop_encoder: str, dropout: bool):
    """Dropout on (encoder 0.1 and CF 0.1) or off everywhere."""
    if dropout:
        return replace(opts, cf_dropout=0.1)
    return replace(opts, cf_dropout=0.0, encoder=nodrop_encoder)


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_single_equals_e2e(task_opts, dropout, n_steps):
    opts, data, nodrop = task_opts
    opts = with_dropout(opts, nodrop, dropout)
    e2e, _ = run_steps(replace(opts, strategy="e2e"), data, n_steps)
    single, res = run_steps(replace(opts, strategy="single"), data, n_steps)
    p_e2e, p_single = params(e2e), params(single)
    init, _ = run_steps(opts, data, 0)
    assert max_diff(p_e2e, params(init)) > 1e-4  # the steps really moved the parameters
    assert max_diff(p_e2e, p_single) < TOL
    assert all(r.occurrences > r.unique for r in res)  # the batches really repeat items


def test_dropout_masks_matter(task_opts):
    """Guard for the test above: with keyed dropout off, E2E and Single-step do differ."""
    opts, data, _ = task_opts
    e2e, _ = run_steps(replace(opts, strategy="e2e", keyed_dropout=False), data, 1)
    single, _ = run_steps(replace(opts, strategy="single", keyed_dropout=False), data, 1)
    assert max_diff(params(e2e), params(single)) > 1e-4


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
def test_multi_window_1_equals_single(task_opts, dropout):
    opts, data, nodrop = task_opts
    # One window-end chunk per step: the re-encode then has the very shapes of the cache fill,
    # so the regression's (h - cached h) term is exactly zero rather than float rounding that
    # Adam would amplify on near-zero gradient coordinates.
    opts = replace(
        with_dropout(opts, nodrop, dropout), table_lr=1.0, window="1", encoder_batch_size=512
    )
    single, _ = run_steps(replace(opts, strategy="single"), data, 3)
    multi, _ = run_steps(replace(opts, strategy="multi"), data, 3)
    assert max_diff(params(single), params(multi)) < TOL
