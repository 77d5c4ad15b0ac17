"""The encoder's activation figure counts the tensors its graph keeps alive for the backward:
each storage once, no parameter (nor view of one), however the layers save them."""

from __future__ import annotations

import torch
from tiny import options
from torch import nn

from gram_scale.data.load import load_data
from gram_scale.runner import SavedActivations
from gram_scale.trainer import setup


class SavesWeight(torch.autograd.Function):
    """A linear layer that saves its weight itself, as DeepSpeed ZeRO-3's linear does."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


def test_parameters_are_not_counted():
    """torch's linear saves a view of its weight, ZeRO-3's the weight itself: neither counts.
    What counts: the layer's input and the ReLU's output, 4 x 256 float32 each."""
    lin = nn.Linear(256, 256, bias=False)  # 256 KiB of weight, far more than the activations
    x = torch.randn(4, 256, requires_grad=True)
    act = 4 * 256 * 4
    for forward in (lambda: lin(x).relu(), lambda: SavesWeight.apply(x, lin.weight).relu()):
        saved = SavedActivations()
        with saved.hooks():
            y = forward()
        assert saved.bytes == 2 * act
        y.sum().backward()  # the graph still works: the hooks hand the tensors back
    assert lin.weight.grad is not None


def test_a_tensor_saved_twice_counts_once():
    x = torch.randn(8, 8, requires_grad=True)
    saved = SavedActivations()
    with saved.hooks():
        (x * x).sum()  # mul saves x as both operands
    assert saved.bytes == 8 * 8 * 4


def test_the_runner_counts_activations_not_weights(kt_dir, tiny_encoder):
    """One encoder call with gradient: the runner's figure leaves out the linear weights that
    every layer saves for its backward (the old count, every saved tensor's bytes, had them)."""
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder))
    s = setup(opts, load_data(opts))
    runner = s.runner
    everything = [0]

    def count_all(t):
        everything[0] += t.numel() * t.element_size()
        return t

    items = torch.arange(2)
    runner.encode(items, salt=0, grad=True)
    ids, mask = runner.tokens.rows(items)
    with torch.autograd.graph.saved_tensors_hooks(count_all, lambda t: t):
        s.encoder(ids, mask)
    weights = sum(
        m.weight.numel() * m.weight.element_size()
        for m in s.encoder.modules()
        if isinstance(m, nn.Linear)
    )
    kept = runner.peak_activation_bytes
    assert kept > 0
    assert everything[0] >= kept + weights  # what the old count said
