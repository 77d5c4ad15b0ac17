"""Tiny models and data for fast tests: a 2-layer BERT with MiniLM's tokenizer, 2-layer decoders,
small synth sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gram_scale.bench.tiny import make_tiny_bert, write_decoder_tokenizer
from gram_scale.config import Options, validate


def make_tiny_encoder(folder: Path, dropout: float = 0.1, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised BERT folder (hidden 32, 2 layers) with the MiniLM tokenizer."""
    return make_tiny_bert(folder, dropout=dropout, hidden=hidden, seed=seed)


def make_tiny_decoder(
    folder: str | Path, kind: str = "llama", dropout: float = 0.1, hidden: int = 32, seed: int = 0
) -> Path:
    """A randomly initialised 2-layer decoder-only folder, Llama or GPT-2 shaped, with the
    MiniLM vocabulary and a tokenizer without a pad token (left-padding for Llama, as Llama
    tokenizers do, right-padding for GPT-2)."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=30522,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            attention_dropout=dropout,
        )
        model_class, side = LlamaModel, "left"
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=30522,
            n_embd=hidden,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        model_class, side = GPT2Model, "right"
    else:
        raise ValueError(f"unknown decoder kind {kind!r}")

    def write(tmp: Path) -> None:
        model_class(config).save_pretrained(str(tmp))
        write_decoder_tokenizer(tmp, side)

    from gram_scale.data.load import generate_once

    return generate_once(Path(folder), write)


def options(**kw) -> Options:
    """Validated options for a quick run (no progress bar, no exports unless asked)."""
    base = dict(
        progress=False,
        export=False,
        epochs=1,
        batch_size=8,
        seq_len=20,
        max_tokens=16,
        lr_encoder=1e-3,
        lr_cf=1e-3,
        encoder_batch_size=16,
        history_len=10,
        cf_heads=2,
    )
    base.update(kw)
    return validate(Options(**base))


def replace(opts: Options, **kw) -> Options:
    """A copy of options with some fields changed."""
    return validate(dataclasses.replace(opts, **kw))


def params(session) -> dict[str, torch.Tensor]:
    """A detached copy of every encoder and CF parameter of a session."""
    out = {f"enc.{k}": v.detach().clone() for k, v in session.encoder.named_parameters()}
    out.update({f"cf.{k}": v.detach().clone() for k, v in session.task.model.named_parameters()})
    return out


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two parameter dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fake_valid_auc(mp, aucs: dict[int, float]) -> None:
    """Through ``mp`` (a pytest MonkeyPatch), the trainer's valid AUC after ``k`` steps trained
    becomes ``aucs[k]`` where ``k`` is a key; other evaluations and test metrics stay real."""
    from gram_scale import trainer

    done = [0]
    make_strategy, evaluate = trainer.make_strategy, trainer.evaluate

    def counting(*args, **kw):
        strategy = make_strategy(*args, **kw)
        step = strategy.step

        def counted(batch, i, *rest):
            done[0] = i + 1
            return step(batch, i, *rest)

        strategy.step = counted
        return strategy

    def faked(task, vectors, split):
        got = evaluate(task, vectors, split)
        return got | {"auc": aucs[done[0]]} if split == "valid" and done[0] in aucs else got

    mp.setattr(trainer, "make_strategy", counting)
    mp.setattr(trainer, "evaluate", faked)
