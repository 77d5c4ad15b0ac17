"""Encoder pass counts per strategy, CF-only steps leave the encoder untouched, the item table."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import run_steps
from tiny import options, replace

from gram_scale.accumulator import ItemTable
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
    opts = replace(
        opts, strategy="multi", window="3", encoder_epochs=encoder_epochs, encoder_batch_size=7
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
    t.clear()
    assert len(t) == 0 and t.missing(torch.tensor([2])).tolist() == [2]
