"""GRAM Single-step equals E2E; Multi-step with a 1-step window equals Single-step.

The runs are in float64 (``--precision fp64``): summation order then changes a gradient by about
1e-16 of its terms, far below Adam's eps (1e-8), so Adam cannot blow that noise up into
parameter-sized steps on near-zero gradient coordinates the way it does in float32. Every
comparison has a guard beside it that breaks exactness on purpose and must be caught."""

from __future__ import annotations

import pytest
import torch
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


def over_budget(session, batch) -> bool:
    """Whether a step's unique items, cut by the chunk rule, hold more padded tokens than
    --encoder-tokens (then Single-step encodes them twice)."""
    items = torch.unique(batch.items[batch.items >= 0])
    cuts = session.runner.cut(items)
    return session.runner.graph_tokens(cuts, items) > session.strategy.budget


def single_vs_e2e(opts, data, n_steps: int, scale_one_item: float | None = None) -> float:
    """Largest parameter difference between E2E and Single-step after ``n_steps`` Adam steps."""
    e2e, _ = run_steps(replace(opts, strategy="e2e"), data, n_steps)
    single, res = run_steps(replace(opts, strategy="single"), data, n_steps, scale_one_item)
    assert all(r.occurrences > r.unique for r in res)  # the batches really repeat items
    batches = single.task.train_batches(0)
    over = [over_budget(single, next(batches)) for _ in res]
    # a second pass exactly on the steps over the budget: 2 forwards per item there, else 1
    assert [r.item_forwards for r in res] == [r.unique * (1 + o) for r, o in zip(res, over)]
    assert single.runner.item_recomputes == sum(r.unique for r, o in zip(res, over) if o)
    init, _ = run_steps(opts, data, 0)
    assert max_diff(params(e2e), params(init)) > 1e-4  # the steps really moved the parameters
    return max_diff(params(e2e), params(single))


# (steps, rows a call, --encoder-tokens, whether Single-step re-encodes): one step with every
# item in one call; three steps in calls of 16 rows (fewer than a step's unique items) whose
# graphs fit the budget together (one forward, graphs kept); the same calls over a budget of 64
# tokens, less than a step's (encoded without gradient, then again with, call by call).
STEPS_AND_CHUNKS = {
    "1-one-call": (1, 512, 8192, False),
    "3-calls-kept": (3, 16, 8192, False),
    "3-calls-re-encoded": (3, 16, 64, True),
}


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("case", list(STEPS_AND_CHUNKS))
def test_single_equals_e2e(task_opts, dropout, case):
    n_steps, rows, budget, again = STEPS_AND_CHUNKS[case]
    opts, data, nodrop = task_opts
    opts = replace(
        with_dropout(opts, nodrop, dropout), encoder_batch_size=rows, encoder_tokens=budget
    )
    s, res = run_steps(replace(opts, strategy="single"), data, n_steps)
    assert (s.runner.item_recomputes > 0) == again
    assert (max(r.unique for r in res) > rows) == (n_steps > 1)  # several calls a step
    assert single_vs_e2e(opts, data, n_steps) < TOL


def test_single_equals_e2e_with_calls_in_the_given_order(task_opts):
    """--chunk-order given (no sort by length): other calls, with more padding, and the same
    result. The hardest case of the table above: dropout on, calls re-encoded."""
    n_steps, rows, budget, again = STEPS_AND_CHUNKS["3-calls-re-encoded"]
    opts, data, nodrop = task_opts
    opts = with_dropout(opts, nodrop, True)
    opts = replace(opts, encoder_batch_size=rows, encoder_tokens=budget, chunk_order="given")
    s, _ = run_steps(replace(opts, strategy="single"), data, 1)
    assert (s.runner.item_recomputes > 0) == again
    batch = next(s.task.train_batches(0))
    items = torch.unique(batch.items[batch.items >= 0])
    given, by_length = s.runner.cut(items), s.tokens.cut(items, rows, budget)
    assert s.runner.graph_tokens(given, items) > s.runner.graph_tokens(by_length, items)
    assert single_vs_e2e(opts, data, n_steps) < TOL


def test_guard_chunk_recompute_with_other_masks_is_caught(task_opts, monkeypatch):
    """Guard: a chunk re-encoded under another dropout key than its first pass fails the test."""
    from gram_scale.runner import EncoderRunner

    real = EncoderRunner.recompute
    monkeypatch.setattr(
        EncoderRunner, "recompute", lambda self, items, salt, *a: real(self, items, salt + 1, *a)
    )
    opts, data, nodrop = task_opts
    opts = replace(with_dropout(opts, nodrop, True), encoder_tokens=64)  # re-encoded calls
    assert single_vs_e2e(opts, data, 3) > 100 * TOL


def test_single_step_memory_is_one_chunk(task_opts):
    """The encoder graph kept for a backward is one call's when the step's calls do not fit
    --encoder-tokens together (then each is re-encoded), and all of them when they fit."""
    opts, data, _ = task_opts
    for rows, budget, again in (
        (4, 4 * opts.max_tokens, True),
        (8, 8 * opts.max_tokens, True),
        (8, 8192, False),
    ):
        s, res = run_steps(
            replace(opts, strategy="single", encoder_batch_size=rows, encoder_tokens=budget),
            data,
            1,
        )
        assert (s.runner.item_recomputes > 0) == again
        kept = s.runner.peak_activation_bytes
        items = torch.unique(next(s.task.train_batches(0)).items)[1:]  # -1 first: padding
        assert len(items) == res[0].unique > 4 * rows
        # each call's graph, measured alone
        alone = []
        for pos in s.runner.cut(items):
            s.runner.peak_activation_bytes = 0
            s.runner.drop_graphs()
            s.runner.encode(items[pos], salt=0, grad=True)
            alone.append(s.runner.peak_activation_bytes)
        want = max(alone) if again else sum(alone)
        assert kept == want
        assert want < sum(alone) / 4 if again else len(alone) > 4


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
# and gradients' scale (--target-distance). No CF refresh: its replayed steps are extra CF steps;
# every window updates the encoder (--last-window update), the last one too.
RULES = {
    "fixed-rates": dict(table_lr=1000.0, target_lr=37.0, target_distance=0.0),
    "target-distance": dict(target_distance=4.0),
}


def multi_vs_single(
    opts, data, scale_one_item: float | None = None, rule: str = "fixed-rates"
) -> float:
    """Largest parameter difference between Single-step and 1-step-window Multi-step."""
    # 16-item chunks, fewer than a step's unique items: the window end's chunking is exercised;
    # the auto regress batch of a 1-step window is all its items, one mini-batch
    opts = replace(
        opts,
        window="1",
        encoder_batch_size=16,
        regress_batch_size="auto",
        cf_refresh=0,
        last_window="update",
        **RULES[rule],
    )
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
    kept = [
        run_steps(replace(o, strategy="single"), data, 1)[0].runner.peak_activation_bytes
        for o in (opts, checkpointed)
    ]
    assert kept[1] < kept[0] / 2, kept


def test_guard_recompute_with_other_masks_is_caught(task_opts, monkeypatch):
    """Guard: when the recompute draws other masks (keyed by row position, not item: E2E and
    Single-step place an item at different rows), the test above fails."""
    import torch.nn.functional as F

    from gram_scale.encoder import dropout

    def other_masks():
        active = F.dropout
        if not isinstance(active, dropout._KeyedDropout):
            return dropout.contextlib.nullcontext(), dropout.contextlib.nullcontext()
        other = dropout._KeyedDropout(dropout.torch.arange(len(active.row_keys)), active.calls)
        return dropout.contextlib.nullcontext(), dropout._installed(other)

    monkeypatch.setattr(dropout, "replay_context", other_masks)
    opts, data, nodrop = task_opts
    opts = replace(with_dropout(opts, nodrop, True), gradient_checkpointing=True)
    assert single_vs_e2e(opts, data, 3) > 100 * TOL


def test_an_items_vector_does_not_depend_on_its_chunk(task_opts):
    """Encoded alone or in a chunk with longer (and shorter) texts, an item gets the same vector
    within 1e-12 in float64, with keyed dropout on (train mode) and in eval mode: right padding
    is masked out, and its dropout mask is keyed by the item, not by its row or the width."""
    opts, data, _ = task_opts
    s, _ = run_steps(replace(opts, strategy="single"), data, 0)
    lengths = s.tokens.lengths
    order = torch.argsort(lengths, stable=True)
    shorter = order[lengths[order] < lengths.max()]
    mid = shorter[len(shorter) // 2 :][:1]  # a text shorter than the longest
    others = torch.cat([order[:3], order[-5:]])  # 3 shorter (or equal) texts, 5 longest
    assert lengths[others].max() > lengths[mid].max()
    chunk = torch.cat([others[:4], mid, others[4:]])
    alone = s.runner.encode(mid, salt=7, grad=False)
    together = s.runner.encode(chunk, salt=7, grad=False)[4:5]
    assert float((alone - together).abs().max()) < 1e-12
    assert float((alone - s.runner.encode(mid, salt=8, grad=False)).abs().max()) > 1e-6  # masks
    s.encoder.eval()
    with torch.no_grad():
        eval_alone = s.encoder(*s.tokens.rows(mid))
        eval_together = s.encoder(*s.tokens.rows(chunk))[4:5]
    assert float((eval_alone - eval_together).abs().max()) < 1e-12
