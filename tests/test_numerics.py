"""The encoder's attention kernel and bf16: what ``--attn-implementation`` and ``--precision``
choose, and that the run really computes that way."""

from __future__ import annotations

import pytest
import torch
from tiny import options, replace

from gram_scale.data.load import load_data
from gram_scale.encoder.loading import load_encoder
from gram_scale.errors import InputError
from gram_scale.trainer import setup


def kernel(folder, choice="auto", keyed=True) -> str:
    encoder, _ = load_encoder(str(folder), attention=choice, keyed=keyed)
    return encoder.model.config._attn_implementation


def test_auto_attention_is_sdpa_unless_keyed_attention_dropout(tiny_encoder, tiny_encoder_nodrop):
    assert kernel(tiny_encoder) == "eager"  # attention dropout 0.1, keyed
    assert kernel(tiny_encoder, keyed=False) == "sdpa"
    assert kernel(tiny_encoder_nodrop) == "sdpa"  # no dropout to key
    assert kernel(tiny_encoder_nodrop, "eager") == "eager"


@pytest.mark.parametrize("choice", ["sdpa", "flash_attention_2"])
def test_kernels_that_cannot_key_dropout_are_refused(tiny_encoder, choice):
    with pytest.raises(InputError, match="keyed masks cannot reach"):
        kernel(tiny_encoder, choice)


def test_flash_attention_needs_a_gpu_and_the_package(tiny_encoder_nodrop):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    with pytest.raises(InputError, match="flash_attention_2 needs a GPU"):
        kernel(tiny_encoder_nodrop, "flash_attention_2")


def test_sdpa_and_eager_give_the_same_vectors(tiny_encoder_nodrop):
    """Padding masks reach both kernels alike (rows of different lengths)."""
    ids = torch.randint(1000, 2000, (6, 16))
    mask = torch.ones(6, 16, dtype=torch.long)
    for r in range(6):
        mask[r, 4 + 2 * r :] = 0
    out = {}
    for choice in ("eager", "sdpa"):
        encoder, _ = load_encoder(str(tiny_encoder_nodrop), attention=choice)
        out[choice] = encoder.eval()(ids, mask)
    assert (out["eager"] - out["sdpa"]).abs().max() < 1e-5


def test_bf16_without_deepspeed_autocasts_the_encoder(kt_dir, tiny_encoder):
    """float32 weights (and gradients), the encoder's matrix products in bf16; training moves."""
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), precision="bf16")
    s = setup(opts, load_data(opts))
    assert s.runner.numerics() == {
        "weights": "float32",
        "compute": "bfloat16",
        "grad_accum": "float32",
        "attention": "eager",
        "built_partitioned": False,
        "read_by_module": False,
    }
    seen = set()
    for m in s.encoder.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    before = [p.detach().clone() for p in s.encoder.parameters()]
    batches = s.task.train_batches(0)
    for step in range(2):
        res = s.strategy.step(next(batches), step)
        assert res.encoder_updated and not res.skipped
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in s.encoder.parameters())
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(s.encoder.parameters(), before)]
    assert max(moved) > 0
    # and fp32 runs stay in fp32
    s32 = setup(replace(opts, precision="fp32"), load_data(opts))
    assert s32.runner.numerics()["compute"] == "float32"
