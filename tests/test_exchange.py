"""Ownership, padding and the registries, in-process (the multi-process exchange is exercised by
test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from tiny import options

from gram_scale.errors import InputError
from gram_scale.exchange import Comm, ItemExchange, in_order, owner_of, padded_calls, pieces
from gram_scale.strategies import make_strategy
from gram_scale.tasks import make_task


def test_owner_is_a_fixed_hash_spread_over_ranks():
    rows = torch.arange(10_000)
    for world in (2, 4, 8):
        owners = owner_of(rows, world)
        assert torch.equal(owners, owner_of(rows.flip(0), world).flip(0))  # order-free
        assert torch.equal(owners[[5, 17]], owner_of(torch.tensor([5, 17]), world))
        counts = torch.bincount(owners, minlength=world)
        assert counts.min() > 0.9 * len(rows) / world  # balanced within 10%


def test_a_rank_with_nothing_to_encode_still_makes_the_calls():
    # the ranks agreed on one call; this rank has no item for it
    (piece,) = padded_calls(torch.zeros(0, dtype=torch.long), [], 1)
    assert piece.real == 0 and len(piece.items) == 1  # one padding call, counted as 0 rows
    assert torch.equal(piece.pad(torch.zeros(0, 3)), torch.zeros(1, 3))
    chunks = pieces(Comm(), torch.arange(5), list(torch.arange(5).split(2)))
    assert [p.real for p in chunks] == [2, 2, 1]


def test_one_process_exchange_is_the_identity():
    local = torch.tensor([3, 8, 9])
    ex = ItemExchange(Comm(), local)
    assert torch.equal(ex.served, local)
    rows = torch.randn(3, 4)
    assert torch.equal(ex.fetch(rows), rows)
    assert torch.equal(ex.return_grads(rows), rows)
    assert ex.grad_traffic() == (0, 0)


def test_unknown_task_or_strategy_raises_from_the_python_api():
    opts = options()
    opts.task = "ranking"
    with pytest.raises(InputError, match="unknown task 'ranking'"):
        make_task(opts, None, 8)
    opts.strategy = "magic"
    with pytest.raises(InputError, match="unknown strategy 'magic'"):
        make_strategy(opts, None, None, 1)


@pytest.mark.parametrize("strategy", ["e2e", "single", "multi"])
def test_one_scalar_collective_per_step(strategy, kt_dir, tiny_encoder, monkeypatch):
    """Loss, loss terms, the finite check, row counts and traffic of a step travel in one call (Multi-step: a step inside its window). E2E and Single-step first agree
    on their number of encoder calls, so that every rank makes the same calls (ZeRO-3), and
    Single-step in the same call on whether any rank must re-encode (over --encoder-tokens)."""
    from gram_scale.data.load import load_data
    from gram_scale.trainer import setup

    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), strategy=strategy, window="3")
    s = setup(opts, load_data(opts))
    batches = s.task.train_batches(0)
    if strategy == "multi":  # the window's first step fills its items' vectors (chunk count)
        s.strategy.step(next(batches), 0)
    calls = []
    for name in ("sum_int", "sum_ints", "sum_floats", "max_int", "max_ints"):
        real = getattr(Comm, name)
        monkeypatch.setattr(
            Comm, name, lambda self, v, _r=real, _n=name: calls.append(_n) or _r(self, v)
        )
    res = s.strategy.step(next(batches), int(strategy == "multi"))
    first = {"single": ["max_ints"], "e2e": ["max_int"], "multi": []}[strategy]
    assert calls == first + ["sum_floats"]
    assert res.totals.ok and res.totals.count > 0


def test_chunk_rule_sorts_by_length_and_caps_rows_and_padded_tokens():
    """Every encode cuts its items sorted by token length (stable), at most --encoder-batch-size
    rows and --encoder-tokens padded tokens (rows x the longest) a call; a text longer than the
    cap gets a call of its own; the calls cover every item once, in any order they come."""
    from gram_scale.data.items import TokenCache

    lengths = torch.tensor([5, 2, 9, 2, 7, 3, 30, 4])
    cache = TokenCache(torch.zeros(8, 30, dtype=torch.long), lengths, 0)
    items = torch.tensor([6, 0, 1, 2, 3, 4, 5, 7])
    cuts = cache.cut(items, max_rows=3)
    assert [items[c].tolist() for c in cuts] == [[1, 3, 5], [7, 0, 4], [2, 6]]
    cuts = cache.cut(items, max_rows=100, max_tokens=20)
    got = [items[c].tolist() for c in cuts]
    assert got == [[1, 3, 5, 7], [0, 4], [2], [6]]  # 4 x 4, 2 x 7, 1 x 9, then 30 alone
    assert all(len(c) * int(lengths[items[c]].max()) <= 20 for c in cuts[:-1])
    assert sorted(torch.cat(cuts).tolist()) == list(range(8))
    assert cache.padded_tokens(torch.tensor([1, 2])) == (11, 18)
    calls = pieces(Comm(), items, cuts)
    assert [c.real for c in calls] == [4, 2, 1, 1]
    assert torch.equal(
        in_order(calls, [c.items.double()[:, None] for c in calls], 8)[:, 0], items.double()
    )


def test_chunk_rule_in_the_given_order_keeps_the_order_and_the_caps():
    """--chunk-order given: the calls take the items in their own order, no sort, under the same
    caps (rows, and padded tokens of the call's longest text so far); on items already sorted
    by length it cuts as the sorted rule does."""
    from gram_scale.data.items import TokenCache

    lengths = torch.tensor([5, 2, 9, 2, 7, 3, 30, 4])
    cache = TokenCache(torch.zeros(8, 30, dtype=torch.long), lengths, 0)
    items = torch.tensor([6, 0, 1, 2, 3, 4, 5, 7])  # lengths 30, 5, 2, 9, 2, 7, 3, 4
    cuts = cache.cut(items, max_rows=3, order="given")
    assert [items[c].tolist() for c in cuts] == [[6, 0, 1], [2, 3, 4], [5, 7]]
    cuts = cache.cut(items, max_rows=100, max_tokens=20, order="given")
    # 30 alone; 2 x 5; then 9 and 2 (2 x 9 = 18), 7 and 3 (14), 4: each call's padded tokens are
    # rows x its longest, not x its last row
    assert [items[c].tolist() for c in cuts] == [[6], [0, 1], [2, 3], [4, 5], [7]]
    assert torch.cat(cuts).tolist() == list(range(8))  # the items' own order
    assert all(len(c) * int(lengths[items[c]].max()) <= 20 for c in cuts[1:])
    assert cache.attention_pairs(torch.tensor([1, 2])) == 2 * 9**2
    ranked = items[torch.argsort(lengths[items], stable=True)]
    for rows, budget in ((3, 0), (100, 20), (4, 16)):
        same = [ranked[c].tolist() for c in cache.cut(ranked, rows, budget, order="given")]
        assert same == [ranked[c].tolist() for c in cache.cut(ranked, rows, budget)]
    with pytest.raises(ValueError, match="chunk order"):
        cache.cut(items, 3, order="random")
