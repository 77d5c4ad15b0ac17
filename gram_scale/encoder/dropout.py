"""Keyed dropout: each row's mask is a hash of (step key, item id, dropout call, element
coordinates) instead of a draw from the global RNG.

An item then gets the same mask whether it is encoded once (GRAM) or once per occurrence (E2E),
in any chunk, on any rank, which is what makes Single-step exactly equal to E2E with dropout on.
Gradient checkpointing replays the masks in its recomputes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gram_scale.errors import InputError

_M31 = 0x7FFFFFFF


def _hash31(x: torch.Tensor) -> torch.Tensor:
    # 31-bit integer mixer; every product stays below 2**63, so no int64 overflow.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


# A fixed field of pseudo-random 24-bit integers per element shape (and device), shared by every
# row, call and step: made once, so a mask costs elementwise arithmetic only. Each value is a
# hash of the element's coordinates, not a draw in sequence, so an element gets the same value
# whatever the sizes of the other dimensions: an item padded to 12 tokens in one chunk and to 16
# in another draws the same mask on its real tokens.
_FIELDS: dict[tuple, torch.Tensor] = {}
_FIELD_BYTES = 256 * 2**20  # cache budget; shapes vary with the padded length of a chunk
_COORD_PRIMES = (0x2545F491, 0x1B873593, 0x0CC9E2D5, 0x5BD1E995, 0x27D4EB2F)


def _field(shape: tuple[int, ...], device) -> torch.Tensor:
    key = (shape, str(device))
    field = _FIELDS.pop(key, None)
    if field is None:
        acc = torch.zeros(shape, dtype=torch.long, device=device)
        for d, size in enumerate(shape):
            view = [1] * len(shape)
            view[d] = size
            c = torch.arange(size, device=device, dtype=torch.long).view(view)
            acc = (acc + c * _COORD_PRIMES[d % len(_COORD_PRIMES)]) & _M31
        field = (_hash31(acc) & 0xFFFFFF).to(torch.float64)
        while _FIELDS and sum(f.numel() * 8 for f in _FIELDS.values()) + field.numel() * 8 > (
            _FIELD_BYTES
        ):
            _FIELDS.pop(next(iter(_FIELDS)))  # the least recently used
    _FIELDS[key] = field  # most recently used last
    return field


def _row_multipliers(keys: torch.Tensor, device) -> torch.Tensor:
    """Per-row odd 29-bit multiplier over 2**24, from 31-bit row keys (exact in float64)."""
    odd = (_hash31(keys) & 0x1FFFFFFF) | 1
    return (odd.double() / 2.0**24).to(device)


class _KeyedDropout:
    """``F.dropout`` whose mask for each first-dim row depends only on the row's key and the call.

    An element's uniform draw is ``(k * m mod 2**24) / 2**24``: ``k`` is a fixed random 24-bit
    integer per element position, ``m`` an odd multiplier hashed from (row key, call). For odd
    ``m``, ``k -> k * m mod 2**24`` is a bijection, so each row's draws are as uniform as the
    field; rows get unrelated masks unless the ratio of their multipliers is tiny modulo
    2**24, which a hash makes vanishingly rare. The product is below 2**53, so float64 holds it
    exactly and every kernel (vectorised or not, CPU or GPU, fused or not) gives the same bits:
    an item draws the same mask in any chunk. It costs one float64 multiply, a fraction and a
    compare per element, where hashing every element took a dozen 64-bit integer operations.
    """

    def __init__(self, row_keys: torch.Tensor, calls: int = 0):
        self.row_keys = row_keys
        self.calls = calls  # dropout calls so far: part of each call's key

    def dropped(self, shape: tuple[int, ...], p: float, device) -> torch.Tensor:
        """The boolean drop mask of the next call, for ``shape[0]`` rows."""
        self.calls += 1
        keys = (self.row_keys.cpu() + self.calls * 0x3C6EF372) & _M31
        mult = _row_multipliers(keys, device).view(-1, *([1] * (len(shape) - 1)))
        return (_field(tuple(shape[1:]), device) * mult).frac_() < p

    def __call__(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        if x.shape[0] != self.row_keys.shape[0]:
            raise RuntimeError(
                f"keyed dropout expects {self.row_keys.shape[0]} rows first, got shape {tuple(x.shape)}"
            )
        drop = self.dropped(tuple(x.shape), p, x.device)
        return x.mul(1.0 / (1.0 - p)).masked_fill_(drop, 0.0)


@contextlib.contextmanager
def keyed_dropout(row_keys: torch.Tensor | None):
    """Within the block, ``F.dropout`` draws masks keyed by ``row_keys`` (one per first-dim row)."""
    if row_keys is None:
        yield
        return
    original = F.dropout
    F.dropout = _KeyedDropout(row_keys)
    try:
        yield
    finally:
        F.dropout = original


@contextlib.contextmanager
def _installed(dropout):
    original = F.dropout
    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def replay_context():
    """``context_fn`` of a gradient-checkpointed segment: its recompute in backward runs with
    the keyed dropout the forward had at the segment's start (same row keys, same call count),
    so it draws the very masks the forward drew. Outside keyed dropout, nothing to replay."""
    active = F.dropout
    if not isinstance(active, _KeyedDropout):
        return contextlib.nullcontext(), contextlib.nullcontext()
    replay = _KeyedDropout(active.row_keys, active.calls)
    return contextlib.nullcontext(), _installed(replay)


def enable_gradient_checkpointing(encoder) -> None:
    """Hugging Face gradient checkpointing (non-reentrant) whose recomputes replay keyed dropout,
    on a ``ContentEncoder``'s model (not imported here: the model module imports this one)."""
    model = encoder.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(
            "--gradient-checkpointing",
            None,
            f"{type(model).__name__} does not support gradient checkpointing",
        )
    # looked up at each segment, not bound once, so the replay can be swapped (tests' guard)
    kwargs = {"use_reentrant": False, "context_fn": lambda: replay_context()}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs_without_grad(encoder)  # now: a second switch-on (peft's) would lose its handle


def inputs_without_grad(encoder) -> None:
    """Undo ``enable_input_require_grads``, which transformers' checkpointing switch (for any
    ``input_ids`` model) and peft's LoRA wrapper (on a checkpointed model) turn on: it makes the
    input embeddings' output require a gradient, which only reentrant checkpointing needs (its
    segments see no gradient otherwise); ours is non-reentrant. Left on, the backward runs down
    to the embedding output, and under ZeRO-3 DeepSpeed gathers the embedding table (the
    largest single weight: 0.8 GB in bf16 for a 128k vocabulary at width 3072) again before
    that backward, though a frozen table gets no gradient. Each switch-on keeps only its own
    hooks' handles, so this is called after each (checkpointing, then LoRA)."""
    model = encoder.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()


def row_keys(items: torch.Tensor, salt: int) -> torch.Tensor:
    """Per-row dropout keys for item rows under a step/window salt."""
    base = _hash31(torch.tensor([salt & _M31], dtype=torch.long))
    return _hash31((items.long().cpu() * 0x9E3779B1 + base) & _M31)
