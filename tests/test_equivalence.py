"""GRAM Single-step equals E2E; Multi-step with a 1-step window equals Single-step.

The runs are in float64 (``--precision fp64``): summation order then changes a gradient by about
1e-16 of its terms, far below Adam's eps (1e-8), so Adam cannot blow that noise up into
parameter-sized steps on near-zero gradient coordinates the way it does in float32. Every
comparison has a guard beside it that breaks exactness on purpose and must be caught."""

from __future__ import annotations

import pytest
from tiny import max_diff, options, params, replace

from gram_scale.data.load import load_data
from gram_scale.trainer import setup

# float64 noise after a few Adam steps stays below lr * 1e-16 / eps ~ 1e-11 (measured: <= 1e-13);
# a real error moves some parameter by about lr_encoder = 1e-3 (guards measure >= 1e-4).
TOL = 1e-9


def run_steps(opts, data, n_steps: int, scale_one_item: float | None = None):
    """Train ``n_steps`` steps in-process; return the session and the per-step results.

    ``scale_one_item`` multiplies the summed gradient of the first item of every encoder
    backward call by that factor (a guard: a deliberately inexact strategy)."""
    s = setup(opts, data)
    if scale_one_item is not None:
        backward = s.runner.backward

        def skewed(vectors, grads, **kw):
            grads = grads.clone()
            grads[0] *= scale_one_item
            return backward(vectors, grads, **kw)

        s.runner.backward = skewed
    results = []
    batches = s.task.train_batches(0)
    for step in range(n_steps):
        results.append(s.strategy.step(next(batches), step))
    return s, results


@pytest.fixture(params=["kt", "news"])
def task_opts(request, tiny_encoder, tiny_encoder_nodrop, kt_dir, news_dir):
    data_dir = kt_dir if request.param == "kt" else news_dir
    opts = options(
        task=request.param, data=str(data_dir), encoder=str(tiny_encoder), precision="fp64"
    )
    return opts, load_data(opts), str(tiny_encoder_nodrop)


def with_dropout(opts, nodrop_encoder: str, dropout: bool):
    """Dropout on (encoder 0.1 and CF 0.1) or off everywhere."""
    if dropout:
        return replace(opts, cf_dropout=0.1)
    return replace(opts, cf_dropout=0.0, encoder=nodrop_encoder)


def single_vs_e2e(opts, data, n_steps: int, scale_one_item: float | None = None) -> float:
    """Largest parameter difference between E2E and Single-step after ``n_steps`` Adam steps."""
    e2e, _ = run_steps(replace(opts, strategy="e2e"), data, n_steps)
    single, res = run_steps(replace(opts, strategy="single"), data, n_steps, scale_one_item)
    assert all(r.occurrences > r.unique for r in res)  # the batches really repeat items
    chunked = any(r.unique > opts.encoder_batch_size for r in res)
    assert (single.runner.item_recomputes > 0) == chunked  # a second pass exactly when chunked
    init, _ = run_steps(opts, data, 0)
    assert max_diff(params(e2e), params(init)) > 1e-4  # the steps really moved the parameters
    return max_diff(params(e2e), params(single))


# One step with every item in one chunk (the graph of the forward is kept), and three steps in
# chunks of 16, fewer than a step's unique items (encoded without gradient, then again with).
STEPS_AND_CHUNKS = [(1, 512), (3, 16)]


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("n_steps,chunk", STEPS_AND_CHUNKS, ids=["1-one-chunk", "3-chunks-of-16"])
def test_single_equals_e2e(task_opts, dropout, n_steps, chunk):
    opts, data, nodrop = task_opts
    opts = replace(with_dropout(opts, nodrop, dropout), encoder_batch_size=chunk)
    assert single_vs_e2e(opts, data, n_steps) < TOL


def test_guard_chunk_recompute_with_other_masks_is_caught(task_opts, monkeypatch):
    """Guard: a chunk re-encoded under another dropout key than its first pass fails the test."""
    from gram_scale.runner import EncoderRunner

    real = EncoderRunner.recompute
    monkeypatch.setattr(EncoderRunner, "recompute",
                        lambda self, items, salt, *a: real(self, items, salt + 1, *a))  # fmt: skip
    opts, data, nodrop = task_opts
    assert single_vs_e2e(with_dropout(opts, nodrop, True), data, 3) > 100 * TOL


def test_single_step_memory_is_one_chunk(task_opts):
    """The encoder graph kept for a backward is one chunk's, however many items the step has."""
    opts, data, _ = task_opts
    kept = {}
    for chunk in (4, 8, 512):
        s, res = run_steps(replace(opts, strategy="single", encoder_batch_size=chunk), data, 1)
        kept[chunk] = s.runner.peak_activation_bytes
    unique = res[0].unique
    assert unique > 16
    # kept bytes = a * rows of the call + b (the weights a backward holds on to): the step with
    # chunks of 8 kept 8 rows' worth, not the step's ``unique`` rows
    per_row = (kept[8] - kept[4]) / 4
    assert per_row > 0
    assert (kept[512] - kept[8]) / per_row == pytest.approx(unique - 8, rel=0.05), kept


def test_scaled_item_gradient_is_caught(task_opts):
    """Guard: one item's summed gradient off by 1e-3 (relative) in Single-step fails the test."""
    opts, data, nodrop = task_opts
    assert single_vs_e2e(with_dropout(opts, nodrop, False), data, 3, 1 + 1e-3) > 100 * TOL


def test_dropout_masks_matter(task_opts):
    """Guard: with keyed dropout off, E2E and Single-step do differ."""
    opts, data, _ = task_opts
    assert single_vs_e2e(replace(opts, keyed_dropout=False, cf_dropout=0.0), data, 1) > 100 * TOL


# The targets' rate: fixed (rows at 1000, targets at 37: the regression loss is scaled by 1 /
# the target rate, so equality holds at any rates), or set at each window end from the vectors'
# and gradients' scale (--target-distance). No CF refresh: its replayed steps are extra CF steps.
RULES = {"fixed-rates": dict(table_lr=1000.0, target_lr=37.0, target_distance=0.0),
         "target-distance": dict(target_distance=4.0)}  # fmt: skip


def multi_vs_single(opts, data, scale_one_item: float | None = None,
                    rule: str = "fixed-rates") -> float:  # fmt: skip
    """Largest parameter difference between Single-step and 1-step-window Multi-step."""
    # 16-item chunks, fewer than a step's unique items: the window end's chunking is exercised;
    # the auto regress batch of a 1-step window is all its items, one mini-batch
    opts = replace(opts, window="1", encoder_batch_size=16, regress_batch_size="auto",
                   cf_refresh=0, **RULES[rule])  # fmt: skip
    single, _ = run_steps(replace(opts, strategy="single"), data, 3, scale_one_item)
    multi, res = run_steps(replace(opts, strategy="multi"), data, 3)
    assert all(r.unique > 16 and r.encoder_updated for r in res)
    assert multi.runner.scheduler.last_epoch == 3  # one encoder step per window
    return max_diff(params(single), params(multi))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
def test_multi_window_1_equals_single(task_opts, dropout, rule):
    opts, data, nodrop = task_opts
    assert multi_vs_single(with_dropout(opts, nodrop, dropout), data, rule=rule) < TOL


def test_multi_guard_scaled_item_gradient_is_caught(task_opts):
    """Guard: the same comparison catches one item's gradient off by 1e-3 in Single-step."""
    opts, data, nodrop = task_opts
    assert multi_vs_single(with_dropout(opts, nodrop, False), data, 1 + 1e-3) > 100 * TOL


def test_single_equals_e2e_with_gradient_checkpointing(task_opts):
    """Recomputed activations (Hugging Face, non-reentrant) draw the forward's keyed masks."""
    opts, data, nodrop = task_opts
    opts = with_dropout(opts, nodrop, True)
    checkpointed = replace(opts, gradient_checkpointing=True)
    assert single_vs_e2e(checkpointed, data, 3) < TOL
    # the recompute really happens: the encoder keeps fewer activations for its backward
    kept = [run_steps(replace(o, strategy="single"), data, 1)[0].runner.peak_activation_bytes
            for o in (opts, checkpointed)]  # fmt: skip
    assert kept[1] < kept[0] / 2, kept


def test_guard_recompute_with_other_masks_is_caught(task_opts, monkeypatch):
    """Guard: when the recompute draws other masks (keyed by row position, not item: E2E and
    Single-step place an item at different rows), the test above fails."""
    import torch.nn.functional as F

    from gram_scale import encoder

    def other_masks():
        active = F.dropout
        if not isinstance(active, encoder._KeyedDropout):
            return encoder.contextlib.nullcontext(), encoder.contextlib.nullcontext()
        other = encoder._KeyedDropout(encoder.torch.arange(len(active.row_keys)), active.calls)
        return encoder.contextlib.nullcontext(), encoder._installed(other)

    monkeypatch.setattr(encoder, "replay_context", other_masks)
    opts, data, nodrop = task_opts
    opts = replace(with_dropout(opts, nodrop, True), gradient_checkpointing=True)
    assert single_vs_e2e(opts, data, 3) > 100 * TOL
