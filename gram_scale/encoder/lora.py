"""LoRA: the adapted modules, peft's config, wrapping the encoder, and the LoRA export."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from gram_scale.encoder.loading import _auto_model
from gram_scale.encoder.saving import POOLING_FILE
from gram_scale.errors import InputError

if TYPE_CHECKING:
    from gram_scale.encoder.model import ContentEncoder

# Attention query/value projections by module name, in the order tried by ``--lora-targets auto``
LORA_AUTO_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",))


def _matches(names: list[str], target: str) -> bool:
    # peft's rule for a plain name: the module's full name, or its last dotted components
    return any(n == target or n.endswith("." + target) for n in names)


def lora_targets(model: nn.Module, spec: str) -> list[str]:
    """The module names that get adapters: ``spec`` checked against the model, or for ``auto``
    the architecture's query and value projections."""
    names = [n for n, _ in model.named_modules()]
    kind = getattr(model.config, "model_type", "this")
    if spec.strip() == "auto":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind)
        for choice in (*LORA_AUTO_TARGETS, *([tuple(known)] if known else [])):
            if all(_matches(names, t) for t in choice):
                return list(choice)
        raise InputError(
            "--lora-targets",
            None,
            f"auto: no known attention projections in the "
            f"{kind} model; name its modules (e.g. {_linear_names(model)})",
        )
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    for t in targets:
        if not _matches(names, t):
            raise InputError(
                "--lora-targets",
                None,
                f"{t!r} matches no module of the {kind} "
                f"model; its linear layers are {_linear_names(model)}",
            )
    return targets


def _linear_names(model: nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    leaves = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    }
    return ", ".join(sorted(leaves)) or "none"


def lora_config(opts, model: nn.Module):
    """The peft LoraConfig of ``--lora-*`` options for ``model``."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, opts.lora_targets)
    # GPT-2's Conv1D stores its weight transposed; peft must be told (it warns otherwise)
    conv = any(
        isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
        for n, m in model.named_modules()
    )
    return LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv,
    )


def apply_lora(encoder: ContentEncoder, opts) -> None:
    """Wrap the encoder's transformer with LoRA adapters; only they stay trainable."""
    from peft import get_peft_model

    config = lora_config(opts, encoder.model)
    try:
        encoder.model = get_peft_model(encoder.model, config)
    except ValueError as exc:
        raise InputError("--lora-targets", None, str(exc).splitlines()[0]) from None


@contextlib.contextmanager
def _zero3_off():
    """Keep transformers from building a model inside ``deepspeed.zero.Init`` (a collective)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def save_lora_encoder(
    base_path: str, opts, tokenizer, state_dict: dict, folder: Path, adapter: Path, pooling: str
):
    """Write the adapter alone (``adapter``) and the merged encoder as a plain HF folder.

    Built on a fresh CPU copy of the base model so it works the same whatever sharded the
    trained one (under ZeRO-3 the live parameters are empty partitions)."""
    from peft import get_peft_model, get_peft_model_state_dict

    with _zero3_off():  # a plain CPU model on the main process only, not a ZeRO-3 partition
        base = _auto_model(base_path)
    peft_model = get_peft_model(base, lora_config(opts, base))
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"LoRA export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapter_state = get_peft_model_state_dict(peft_model)
    peft_model.save_pretrained(str(adapter), state_dict=adapter_state)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / POOLING_FILE).write_text(json.dumps({"pooling": pooling}) + "\n")
