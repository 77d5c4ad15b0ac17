"""Encoder pass counts per strategy, CF-only steps leave the encoder untouched, the item table."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import run_steps
from tiny import options, replace

from gram_scale.accumulator import ItemTable
from gram_scale.data.batches import Batch, gather, merge_batches
from gram_scale.data.load import load_data
from gram_scale.trainer import setup


@pytest.fixture(params=["kt", "news"])
def base(request, tiny_encoder, kt_dir, news_dir):
    folder = kt_dir if request.param == "kt" else news_dir
    opts = options(task=request.param, data=str(folder), encoder=str(tiny_encoder))
    return opts, load_data(opts)


def test_e2e_backprops_every_occurrence(base):
    opts, data = base
    s, results = run_steps(replace(opts, strategy="e2e"), data, 3)
    batches = s.task.train_batches(0)
    for r in results:
        occurrences = next(batches).occurrences()
        assert r.item_forwards == r.item_backwards == r.occurrences == occurrences


def test_single_backprops_each_unique_item_once(base):
    opts, data = base
    s, results = run_steps(replace(opts, strategy="single"), data, 3)
    batches = s.task.train_batches(0)
    for r in results:
        b = next(batches)
        unique = len(torch.unique(b.items[b.items >= 0]))
        assert r.item_forwards == r.item_backwards == r.unique == unique
        assert r.occurrences == b.occurrences() > unique


@pytest.mark.parametrize("encoder_epochs", [1, 2])
def test_multi_backprops_each_touched_item_per_window(base, encoder_epochs):
    opts, data = base
    # no CF refresh: it would fill the next window's cache at this window's end
    opts = replace(
        opts,
        strategy="multi",
        window="3",
        encoder_epochs=encoder_epochs,
        encoder_batch_size=7,
        cf_refresh="0",
    )
    s, results = run_steps(opts, data, 6)
    batches = list(s.task.train_batches(0))[:6]
    for w in range(2):
        window = batches[3 * w : 3 * w + 3]
        touched = torch.unique(torch.cat([b.items[b.items >= 0] for b in window]))
        res = results[3 * w : 3 * w + 3]
        assert sum(r.item_forwards for r in res) == len(touched) * (1 + encoder_epochs)
        assert [r.item_backwards for r in res] == [0, 0, len(touched) * encoder_epochs]
        assert [r.encoder_updated for r in res] == [False, False, True]


def test_multi_window_items_are_encoded_at_its_start_in_full_chunks(base):
    """The first step of a window encodes every item the window's batches hold, in chunks of
    --encoder-batch-size (all full but the last); its other steps make no encoder call."""
    opts, data = base
    s = setup(replace(opts, strategy="multi", window="5", encoder_batch_size=16), data)
    batches = list(s.task.train_batches(0))
    calls = []
    encode = s.runner.encode
    s.runner.encode = lambda *a, **k: calls.append(len(a[0])) or encode(*a, **k)
    first = s.strategy.step(batches[0], 0)
    window = torch.unique(torch.cat([b.items[b.items >= 0] for b in batches[:5]]))
    assert first.item_forwards == sum(calls) == len(window) > 16
    assert all(c == 16 for c in calls[:-1]) and 0 < calls[-1] <= 16
    for step in range(1, 4):
        assert s.strategy.step(batches[step], step).item_forwards == 0
    assert sum(calls) == len(window)
    assert not s.runner.lockstep


def test_cf_only_step_leaves_encoder_bitwise_unchanged(base):
    opts, data = base
    s = setup(replace(opts, strategy="multi", window="3"), data)
    batches = s.task.train_batches(0)
    s.strategy.step(next(batches), 0)
    before = {k: v.detach().clone() for k, v in s.encoder.named_parameters()}
    cf_before = {k: v.detach().clone() for k, v in s.task.model.named_parameters()}
    s.strategy.step(next(batches), 1)  # still inside the window
    for k, v in s.encoder.named_parameters():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, cf_before[k]) for k, v in s.task.model.named_parameters())
    s.strategy.step(next(batches), 2)  # window end: now the encoder moves
    assert any(not torch.equal(v, before[k]) for k, v in s.encoder.named_parameters())


def test_table_holds_exactly_the_touched_items(base):
    opts, data = base
    s = setup(replace(opts, strategy="multi", window="3"), data)
    touched = set()
    for step, batch in zip(range(3), s.task.train_batches(0)):
        s.strategy.step(batch, step)
        touched |= set(batch.items[batch.items >= 0].tolist())
        if step < 2:
            assert set(s.strategy.table.items().tolist()) == touched
    assert len(s.strategy.table) == 0  # cleared at the window end


def test_table_rows_move_by_sgd():
    t = ItemTable(dim=3, lr=0.5, capacity=1)
    t.insert(torch.tensor([7, 2]), torch.tensor([[1.0, 1, 1], [2, 2, 2]]))
    t.apply(torch.tensor([2]), torch.tensor([[1.0, 0, -2]]))
    t.apply(torch.tensor([2, 7]), torch.tensor([[1.0, 0, 0], [4, 4, 4]]))
    assert torch.equal(t.rows(torch.tensor([2, 7])), torch.tensor([[1.0, 2, 3], [-1, -1, -1]]))
    assert t.missing(torch.tensor([1, 2, 7, 9])).tolist() == [1, 9]
    h = torch.tensor([[1.0, 2, 3]])
    assert torch.equal(t.regression_grad(torch.tensor([2]), h), torch.tensor([[0.0, 0, 0]]))
    # At the cached vector the regression gradient is the summed CF gradient, at any rate.
    cached = torch.tensor([[2.0, 2, 2]])
    assert torch.equal(t.regression_grad(torch.tensor([2]), cached), torch.tensor([[2.0, 0, -2]]))
    assert torch.equal(
        t.regression_grad(torch.tensor([2]), torch.tensor([[3.0, 2, 2]])),
        torch.tensor([[4.0, 0, -2]]),
    )
    t.clear()
    assert len(t) == 0 and t.missing(torch.tensor([2])).tolist() == [2]


def test_regression_targets_move_at_their_own_rate():
    t = ItemTable(dim=2, lr=0.5, target_lr=4.0)
    t.insert(torch.tensor([3]), torch.tensor([[1.0, 2]]))
    t.apply(torch.tensor([3]), torch.tensor([[1.0, -1]]))
    # The CF model reads the row at 0.5; the regression pulls towards the target at 4.
    assert torch.equal(t.rows(torch.tensor([3])), torch.tensor([[0.5, 2.5]]))
    target = torch.tensor([[-3.0, 6]])
    assert torch.equal(t.regression_grad(torch.tensor([3]), target), torch.zeros(1, 2))
    cached = torch.tensor([[1.0, 2]])
    assert torch.equal(t.regression_grad(torch.tensor([3]), cached), torch.tensor([[1.0, -1]]))
    assert torch.equal(
        t.regression_grad(torch.tensor([3]), torch.tensor([[5.0, 2]])), torch.tensor([[2.0, -1]])
    )


def _touched(batches) -> torch.Tensor:
    return torch.unique(torch.cat([b.items[b.items >= 0] for b in batches]))


def _encoder_steps_per_window(opts, data, window: int, windows: int) -> list[int]:
    """Encoder optimizer steps taken at each window end (counted by the LR scheduler, which
    advances once per applied optimizer step)."""
    s = setup(replace(opts, strategy="multi", window=str(window)), data)
    batches = s.task.train_batches(0)
    seen = [0]
    for step in range(window * windows):
        s.strategy.step(next(batches), step)
        if (step + 1) % window == 0:
            seen.append(s.runner.scheduler.last_epoch)
    assert s.runner.optimizer.state_dict()["state"][0]["step"] == seen[-1]  # AdamW agrees
    return [b - a for a, b in zip(seen, seen[1:])]


@pytest.mark.parametrize("encoder_epochs", [1, 2])
def test_multi_auto_regress_batch_makes_about_n_encoder_steps(base, encoder_epochs):
    """An N-step window makes ceil(T / ceil(T / N)) encoder steps per pass (T touched items):
    here N or one fewer, since every window touches at least 16 items per step."""
    from gram_scale.strategies.multi import MIN_REGRESS_BATCH, regress_batches

    opts, data = base
    opts = replace(opts, encoder_epochs=encoder_epochs, encoder_batch_size=7, batch_size=16)
    n = 2
    got = _encoder_steps_per_window(opts, data, n, 2)
    s = setup(opts, data)
    batches = list(s.task.train_batches(0))[: 2 * n]
    touched = [len(_touched(batches[w * n : (w + 1) * n])) for w in range(2)]
    assert min(touched) > MIN_REGRESS_BATCH * n
    assert got == [regress_batches(t, n, None) * encoder_epochs for t in touched]
    assert all((n - 1) * encoder_epochs <= g <= n * encoder_epochs for g in got), got


def test_multi_auto_regress_batch_holds_at_least_16_items():
    """A window touching few items per step makes fewer, fuller encoder steps: mini-batches of
    at least 16 items (or all the window's items when it touches fewer)."""
    from gram_scale.strategies.multi import regress_batch

    assert regress_batch(68, 30, None) == 16  # kt-small's 1E window: not 3 items a step
    assert regress_batch(700, 40, None) == 18  # many items a step: touched / steps
    assert regress_batch(10, 30, None) == 10  # fewer than 16 items: one mini-batch of all
    assert regress_batch(68, 30, 5) == 5  # a set size is kept


def test_regress_lr_scale_rules():
    """The window-end rate factor from the window's steps over its regression steps: the
    square root (capped at 2x), the ratio (capped at 4x), or 1; never under 1."""
    from gram_scale.strategies.multi import regress_lr_scale

    assert regress_lr_scale("sqrt", 48, 17) == pytest.approx((48 / 17) ** 0.5)
    assert regress_lr_scale("linear", 48, 17) == pytest.approx(48 / 17)
    assert regress_lr_scale("sqrt", 129, 30) == 2.0  # sqrt(4.3), capped
    assert regress_lr_scale("linear", 129, 30) == 4.0  # 4.3, capped
    assert regress_lr_scale("same", 129, 30) == 1.0
    assert regress_lr_scale("linear", 10, 12) == regress_lr_scale("sqrt", 10, 12) == 1.0


def test_auto_rate_rule_threshold():
    """auto takes the linear rule when the summed accumulated gradients are at least 0.006 of
    the summed |vector| x sqrt(touches) of the same rows."""
    from gram_scale.strategies.multi import AUTO_LINEAR_GRAD_RATIO, auto_rate_rule

    assert AUTO_LINEAR_GRAD_RATIO == 0.006
    assert auto_rate_rule(1000.0, 6.0) == "linear"
    assert auto_rate_rule(1000.0, 5.99) == "sqrt"
    assert auto_rate_rule(1000.0, 12.9) == "linear"  # news-finetune's first 1E window
    assert auto_rate_rule(1000.0, 3.4) == "sqrt"  # toeic-like's, the highest of the KT ones


def test_table_norms_weigh_vectors_by_sqrt_touches():
    """The table's sums for auto: |cached vector|, |summed gradient|, and |cached vector| x
    sqrt(steps that touched the row)."""
    t = ItemTable(2)
    t.insert(torch.tensor([4, 9]), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    for _ in range(4):
        t.apply(torch.tensor([4]), torch.tensor([[1.0, 0.0]]))
    t.apply(torch.tensor([9]), torch.tensor([[0.0, -3.0]]))
    base, grad, touch = t.norms()
    assert (base, grad, touch) == (7.0, 7.0, 5.0 * 2 + 2.0 * 1)


@pytest.mark.parametrize("threshold, rule", [(0.0, "linear"), (float("inf"), "sqrt")])
def test_multi_auto_rate_rule_is_chosen_once_and_kept(base, monkeypatch, threshold, rule):
    """--regress-lr auto picks its rule at the first window end and keeps it: every window's
    regression steps at that rule's factor (3-step windows regressed in one mini-batch: linear
    3x, sqrt 1.73x), the window records name it, and a checkpoint carries it."""
    import gram_scale.strategies.multi as multi

    monkeypatch.setattr(multi, "AUTO_LINEAR_GRAD_RATIO", threshold)
    opts, data = base
    opts = replace(
        opts,
        strategy="multi",
        window="3",
        regress_batch_size="100000",
        regress_lr="auto",
        cf_refresh="0",
    )
    s = setup(opts, data)
    scales = []
    step = s.runner.step
    s.runner.step = lambda lr_scale=1.0: scales.append(lr_scale) or step(lr_scale)
    batches = s.task.train_batches(0)
    ends = [s.strategy.step(next(batches), i).window_stats for i in range(6)]
    ends = [w for w in ends if w]
    assert [w["rate_rule"] for w in ends] == [rule, rule]
    assert scales == pytest.approx([3.0 if rule == "linear" else 3**0.5] * 2)
    fresh = setup(opts, data).strategy
    assert fresh.rate_rule is None  # undecided until a window end
    fresh.load_state_dict(s.strategy.state_dict())
    assert fresh.rate_rule == rule


def test_multi_regress_batch_covering_the_window_steps_once_per_pass(base):
    opts, data = base
    opts = replace(opts, encoder_epochs=3, regress_batch_size="100000")
    assert _encoder_steps_per_window(opts, data, 4, 2) == [3, 3]


def test_multi_window_end_mini_batches(base):
    """What the window end does, call by call: each pass shuffles the touched items (its own
    shuffle, fixed by seed, window and pass) and cuts them into mini-batches of
    --regress-batch-size; each mini-batch is encoded in chunks of --encoder-batch-size whose
    backward calls accumulate (last=True only on its final chunk) into one optimizer step."""
    from gram_scale.strategies.multi import regress_order

    opts, data = base
    opts = replace(
        opts,
        strategy="multi",
        window="3",
        encoder_epochs=2,
        regress_batch_size="9",
        encoder_batch_size=4,
    )
    s = setup(opts, data)
    calls = []  # ("encode", items) / ("backward", last) / ("step",) at the window end
    runner = s.runner
    encode, backward, step_ = runner.encode, runner.backward, runner.step

    def spy_encode(items, salt, grad, count=None):
        if grad:
            calls.append(("encode", items[:count].tolist()))
        return encode(items, salt, grad, count)

    def spy_backward(vectors, grads, last=True, count=None, items=None):
        calls.append(("backward", last))
        return backward(vectors, grads, last=last, count=count, items=items)

    def spy_step(*args):
        calls.append(("step",))
        return step_(*args)

    runner.encode, runner.backward, runner.step = spy_encode, spy_backward, spy_step
    batches = list(s.task.train_batches(0))[:3]
    for step, batch in enumerate(batches):
        s.strategy.step(batch, step)
    touched = _touched(batches)
    mini_batches, current, lasts = [], [], []
    for call in calls:
        if call[0] == "encode":
            assert 1 <= len(call[1]) <= 4  # a chunk
            current += call[1]
        elif call[0] == "backward":
            lasts.append(call[1])
        else:
            assert lasts == [False] * (len(lasts) - 1) + [True]
            assert len(lasts) == -(-len(current) // 4)  # one backward per chunk
            mini_batches.append(current)
            current, lasts = [], []
    per_pass = -(-len(touched) // 9)
    assert len(mini_batches) == 2 * per_pass and len(touched) > 2 * 9
    lengths = s.tokens.lengths
    for p in range(2):
        got = mini_batches[p * per_pass : (p + 1) * per_pass]
        assert [len(m) for m in got[:-1]] == [9] * (per_pass - 1)
        # each mini-batch is the shuffle's next 9 items, encoded shortest text first
        order = regress_order(touched, opts.seed, 0, p).tolist()
        assert [sorted(m) for m in got] == [
            sorted(order[i : i + 9]) for i in range(0, len(order), 9)
        ]
        assert all(lengths[m].diff().min() >= 0 for m in got if len(m) > 1)
    assert mini_batches[0] != mini_batches[per_pass]  # each pass draws its own shuffle
    assert sorted(sum(mini_batches[:per_pass], [])) == touched.tolist()
    assert regress_order(touched, opts.seed, 1, 0).tolist() != sum(mini_batches[:per_pass], [])


def test_adam_rows_equal_torch_adam_per_row():
    """Per-row Adam: over 20 steps with repeated and untouched rows, each row equals a dense
    ``torch.optim.Adam`` on that one row, stepped only at the steps that touch it."""
    g = torch.Generator().manual_seed(0)
    items = torch.tensor([5, 1, 9, 3])
    start = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = ItemTable(dim=6, lr=0.05, optimizer="adam", capacity=2, dtype=torch.float64)
    t.insert(items[:2], start[:2])
    t.insert(items[2:], start[2:])
    ref = [torch.nn.Parameter(start[i].clone()) for i in range(4)]
    opts = [torch.optim.Adam([p], lr=0.05) for p in ref]
    for step in range(20):
        touched = torch.randperm(4, generator=g)[: 1 + step % 3]  # row 3 waits 5 steps
        if step < 5:
            touched = touched[touched != 3]
        grads = torch.randn(len(touched), 6, generator=g, dtype=torch.float64) * 10 ** (step % 4)
        t.apply(items[touched], grads)
        for k, i in enumerate(touched.tolist()):
            ref[i].grad = grads[k].clone()
            opts[i].step()
    want = torch.stack([p.detach() for p in ref])
    assert torch.allclose(t.rows(items), want, atol=1e-6, rtol=0)
    assert t.step_counts(items).tolist() == [opts[i].state[ref[i]]["step"] for i in range(4)]
    assert not torch.equal(t.rows(items), start)  # the rows did move
    # checkpointed and restored mid-window, the rows move on as before
    copy = ItemTable(dim=6, lr=0.05, optimizer="adam", dtype=torch.float64)
    copy.load_state_dict(t.state_dict())
    more = torch.randn(2, 6, generator=g, dtype=torch.float64)
    t.apply(items[:2], more)
    copy.apply(items[:2], more)
    assert torch.equal(copy.rows(items), t.rows(items))


def test_refresh_merges_batches_into_one_of_their_loss_terms(base):
    """--cf-refresh-merge: the replayed batches merged into one (padded to the widest with the
    tasks' own padding) hold exactly their loss terms: the merged batch's summed loss and term
    count are the batches' sums, and its item rows are theirs in order."""
    opts, data = base
    s = setup(replace(opts, strategy="multi", window="3"), data)
    batches = list(s.task.train_batches(0))[:3]
    narrow = batches[1]  # a narrower batch, as the end of the sequences gives
    batches[1] = Batch(narrow.items[:, :-2], {k: v[:, :-2] for k, v in narrow.fields.items()})
    merged = merge_batches(batches)
    assert merged.items.shape[1] == max(b.items.shape[1] for b in batches)
    assert merged.occurrences() == sum(b.occurrences() for b in batches)
    assert merge_batches(batches[:1]) is batches[0]
    vectors = torch.randn(len(data.catalogue), s.runner.encoder.dim, dtype=s.runner.dtype)
    s.task.model.eval()  # no dropout: the same function on both sides
    parts = [s.task.loss(b, gather(vectors, b.items)) for b in batches]
    whole = s.task.loss(merged, gather(vectors, merged.items))
    assert whole[1] == sum(n for _, n in parts)
    assert abs(float(whole[0]) - sum(float(x) for x, _ in parts)) < 1e-5 * abs(float(whole[0]))
    row = 0
    for b in batches:
        n, w = b.items.shape
        assert torch.equal(merged.items[row : row + n, :w], b.items)
        assert bool((merged.items[row : row + n, w:] == -1).all())
        row += n


def _record_cf_and_encoder_steps(s):
    """Wrap the CF model's and the encoder's optimizer steps: ``seen`` gains an entry per CF
    step, ``encoder_steps`` the number of CF steps taken before each encoder step."""
    seen, encoder_steps = [], []
    step_cf, runner_step = s.cf.step, s.runner.step
    s.cf.step = lambda **k: seen.append(1) or step_cf(**k)
    s.runner.step = lambda *a: encoder_steps.append(len(seen)) or runner_step(*a)
    return seen, encoder_steps


def _items(batches) -> set[int]:
    """The catalogue rows the batches hold, as a set."""
    return set(_touched(batches).tolist())


@pytest.mark.parametrize("merge, cf_steps", [(1, 2), (2, 1)])
def test_cf_refresh_replays_the_window_end_on_fresh_vectors(base, merge, cf_steps):
    """--cf-refresh N: after the window's encoder update the CF model replays the window's last
    N batches on the updated encoder's vectors, --cf-refresh-merge K of them a CF step (N / K
    steps). The next window's cache is filled then (those vectors serve both), only replayed
    items it lacks are encoded besides, and every encode is counted; the encoder itself does
    not move in the replay."""
    opts, data = base
    s = setup(
        replace(opts, strategy="multi", window="3", cf_refresh=2, cf_refresh_merge=merge), data
    )
    batches = list(s.task.train_batches(0))
    for step in range(2):
        s.strategy.step(batches[step], step)
    seen, encoder_steps = _record_cf_and_encoder_steps(s)
    res = s.strategy.step(batches[2], 2)

    replayed, following = _items(batches[1:3]), _items(batches[3:6])
    assert replayed - following  # some replayed items are not in the next window
    assert len(seen) == 1 + cf_steps  # the window's own step, then the replay's
    assert encoder_steps and max(encoder_steps) == 1  # every encoder step came before them
    table_rows = len(_items(batches[:3]))
    assert res.item_forwards == table_rows + len(following) + len(replayed - following)
    assert s.strategy.step(batches[3], 3).item_forwards == 0  # the next window is filled


def test_cf_refresh_follows_a_partial_last_window(base):
    """Under --last-window update, a last window cut short by the run's end is closed by
    ``finish``: the encoder takes its update, then the CF model replays the window's last
    batches (at most --cf-refresh) on the updated vectors, as after a full window, so the final
    model does not pair a CF model trained on the old vectors with the new ones. There is no
    next window: every replayed item is encoded for it."""
    opts, data = base
    s = setup(
        replace(
            opts,
            strategy="multi",
            window="3",
            cf_refresh=2,
            cf_refresh_merge=1,
            max_steps=5,
            last_window="update",
        ),
        data,
    )
    batches = list(s.task.train_batches(0))
    for step in range(5):  # one full window, then 2 steps of the second
        s.strategy.step(batches[step], step)
    seen, encoder_steps = _record_cf_and_encoder_steps(s)
    res = s.strategy.finish(5)

    assert encoder_steps and max(encoder_steps) == 0  # the update came first
    assert len(seen) == 2  # then both of the partial window's batches were replayed
    assert res.item_backwards == len(_items(batches[3:5]))
    assert res.item_forwards == 2 * len(_items(batches[3:5]))  # regression, then the replay


def _encoder_state(s) -> list[torch.Tensor]:
    return [p.detach().clone() for p in s.runner.encoder.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("steps", [6, 5], ids=["full", "partial"])
def test_last_window_trains_the_cf_model_only(base, steps):
    """--last-window cf (the default): in a run of two or more windows, the last one (full, or
    cut short and closed by ``finish``) trains the CF model on the previous update's vectors
    and makes no encoder call at all: the encoder ends as the first window's update left it.
    Under --last-window update the same run's last window updates it."""
    opts, data = base
    opts = replace(opts, strategy="multi", window="3", cf_refresh=2, max_steps=steps)
    assert opts.last_window == "cf"
    runs = {}
    for rule in ("cf", "update"):
        s = setup(replace(opts, last_window=rule), data)
        batches = list(s.task.train_batches(0))
        res = [s.strategy.step(batches[k], k) for k in range(steps)]
        after_first = _encoder_state(s) if rule == "cf" else None
        tail = s.strategy.finish(steps)
        runs[rule] = res, tail, _encoder_state(s), after_first
    res, tail, end, after_first = runs["cf"]
    assert res[2].encoder_updated and res[2].item_backwards > 0  # the first window's update
    assert not any(r.encoder_updated for r in res[3:]) and tail is None
    assert sum(r.item_forwards + r.item_backwards for r in res[3:]) == 0  # filled by the refresh
    assert _same(end, after_first)
    res, tail, end_update, _ = runs["update"]
    updated = res[-1].encoder_updated if steps == 6 else tail is not None and tail.item_backwards
    assert updated and not _same(end_update, end)


def test_a_run_of_one_window_updates_the_encoder_under_last_window_cf(base):
    """--last-window cf never leaves a run without encoder training: a run that is one window
    long updates the encoder at its end, as --last-window update would, bit for bit."""
    opts, data = base
    opts = replace(opts, strategy="multi", window="3", cf_refresh=2, max_steps=3)
    ends = []
    for rule in ("cf", "update"):
        s = setup(replace(opts, last_window=rule), data)
        batches = list(s.task.train_batches(0))
        before = _encoder_state(s)
        res = [s.strategy.step(batches[k], k) for k in range(3)]
        assert res[2].encoder_updated and not _same(_encoder_state(s), before)
        ends.append(_encoder_state(s))
    assert _same(*ends)


def test_target_distance_sets_the_window_end_rate(base):
    """--target-distance K: at each window end the targets' rate is K x the mean |cached
    vector| / the mean |accumulated gradient| of the window's items, so the targets lie K mean
    vector norms away on average, whatever the loss's scale; the history records it."""
    opts, data = base
    s = setup(
        replace(opts, strategy="multi", window="3", target_distance=2.0, cf_refresh="0"), data
    )
    batches = s.task.train_batches(0)
    for step in range(2):
        s.strategy.step(next(batches), step)
    table = s.strategy.table
    base_vecs, grads = table.base_and_grads(table.items())
    res = s.strategy.step(next(batches), 2)  # window end: the rate is set from all 3 steps
    stats = res.window_stats
    assert stats["window_items"] > len(base_vecs)  # the third step touched new items
    want = 2.0 * stats["mean_vector_norm"] / stats["mean_grad_norm"]
    assert stats["target_lr"] == pytest.approx(want, rel=1e-12)
    assert s.strategy.table.target_lr == stats["target_lr"] > 1.0
    assert stats["mean_vector_norm"] == pytest.approx(
        float(s.strategy.cached(s.strategy.window_items(0)).norm(dim=1).mean()), rel=1e-6
    )


def _uncached(monkeypatch):
    """The frozen encoder's cache forgotten before every training encode: each step's items
    are encoded again (the path before the cache, in eval mode)."""
    from gram_scale.runner import EncoderRunner

    vectors = EncoderRunner.vectors

    def forgetting(self, items, salt):
        if self.frozen is not None:
            self.frozen.slot.fill_(-1)
            self.frozen.vectors = self.frozen.vectors[:0]
        return vectors(self, items, salt)

    monkeypatch.setattr(EncoderRunner, "vectors", forgetting)


@pytest.mark.parametrize("strategy", ["single", "e2e", "multi"])
def test_frozen_encoder_encodes_each_item_once_per_run(base, strategy, tmp_path, monkeypatch):
    """--freeze-encoder: each item is encoded once per run, when a step first needs it (eval
    mode: no dropout, so the baseline is deterministic), and the CF model trains on the cached
    vectors; the run's metrics equal those of re-encoding every step's items (float64)."""
    from gram_scale.history import read_history
    from gram_scale.trainer import train

    opts, data = base
    opts = replace(
        opts,
        strategy=strategy,
        freeze_encoder=True,
        precision="fp64",
        window="3",
        max_steps=6,
        encoder_batch_size=7,
    )
    cached = train(replace(opts, output_dir=str(tmp_path / "cached")))
    history = read_history(tmp_path / "cached")
    batches = list(setup(opts, data).task.train_batches(0))[:6]
    if strategy == "multi":  # a window's items are read at its first step
        windows = [_touched(batches[w : w + 3]) for w in (0, 3)]
        new = [len(windows[0]), 0, 0, len(windows[1][~torch.isin(windows[1], windows[0])]), 0, 0]
    else:
        seen, new = torch.zeros(0, dtype=torch.long), []
        for b in batches:
            items = _touched([b])
            new.append(int((~torch.isin(items, seen)).sum()))
            seen = torch.unique(torch.cat([seen, items]))
    assert [h["item_forwards"] for h in history] == new
    assert (
        cached["counters"]["item_forwards"]
        == len(_touched(batches))
        < sum(len(_touched([b])) for b in batches)
    )
    assert cached["counters"]["item_backwards"] == 0
    _uncached(monkeypatch)
    again = train(replace(opts, output_dir=str(tmp_path / "again")))
    assert again["counters"]["item_forwards"] > cached["counters"]["item_forwards"]
    for split in ("valid", "test"):
        for k, v in cached[split].items():
            assert v == pytest.approx(again[split][k], abs=1e-12), (split, k)
    assert cached["valid"]["auc"] != 0.5


@pytest.mark.parametrize(
    "strategy,budget",
    [("single", 8192), ("single", 64), ("e2e", 8192)],
    ids=["single-one-pass", "single-re-encoded", "e2e"],
)
def test_token_counters(base, strategy, budget, tmp_path):
    """The history and metrics.json count the encoder's real tokens (the texts' lengths) and
    padded tokens (rows x the longest text of each call), forward and backward: per step, a
    count computed here from the token lengths and the chunk rule."""
    from gram_scale.history import read_history
    from gram_scale.trainer import train

    opts, data = base
    opts = replace(opts, strategy=strategy, encoder_tokens=budget, max_steps=3)
    metrics = train(replace(opts, output_dir=str(tmp_path / "run")))
    history = read_history(tmp_path / "run")
    s = setup(opts, data)
    lengths = s.tokens.lengths
    want = {
        k: []
        for k in (
            "tokens_forward",
            "padded_forward",
            "tokens_backward",
            "padded_backward",
            "attention_pairs_forward",
            "attention_pairs_backward",
        )
    }
    seen_passes = []
    for batch in list(s.task.train_batches(0))[:3]:
        valid = batch.items[batch.items >= 0]
        rows = valid if strategy == "e2e" else torch.unique(valid)
        cuts = s.tokens.cut(rows, opts.encoder_batch_size, budget)
        padded = sum(len(c) * int(lengths[rows[c]].max()) for c in cuts)
        pairs = sum(len(c) * int(lengths[rows[c]].max()) ** 2 for c in cuts)
        passes = 2 if padded > budget and strategy == "single" else 1
        real = int(lengths[rows].sum())
        for key, value in (
            ("tokens_forward", passes * real),
            ("padded_forward", passes * padded),
            ("tokens_backward", real),
            ("padded_backward", padded),
            ("attention_pairs_forward", passes * pairs),
            ("attention_pairs_backward", pairs),
        ):
            want[key].append(value)
        seen_passes.append(passes)
    assert seen_passes == [2 if budget == 64 else 1] * 3  # the budget really decides
    for key, values in want.items():
        assert [h[key] for h in history] == values, key
        assert metrics["counters"][key] == sum(values), key
    assert want["padded_forward"][0] > want["tokens_forward"][0] > 0
    # the encoder's seconds: each step's, within the step's, adding up to the run's
    seconds = [h["encoder_seconds"] for h in history]
    assert all(0 < e < h["seconds"] for e, h in zip(seconds, history))
    assert metrics["encoder_seconds"] == pytest.approx(sum(seconds))
    shape = metrics["encoder_flops_shape"]
    assert shape["layers"] == s.encoder.model.config.num_hidden_layers and shape["hidden"] > 0
    # BERT's word, position and token-type tables are lookups; their LayerNorm is not
    tables = s.encoder.model.embeddings.named_parameters()
    lookups = sum(p.numel() for name, p in tables if "LayerNorm" not in name)
    assert shape["params"] == sum(p.numel() for p in s.encoder.parameters()) - lookups
    if strategy == "e2e":
        assert metrics["counters"]["tokens_forward"] == sum(
            int(lengths[b.items[b.items >= 0]].sum()) for b in list(s.task.train_batches(0))[:3]
        )
