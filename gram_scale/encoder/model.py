"""The content encoder module: a Hugging Face model pooled to one vector per item.

Encoders (BERT-likes) and decoder-only models (Llama, Qwen2, Mistral, GPT-2 style) both work; a
decoder is run with position ids taken from the attention mask, so that its real tokens get the
same positions (and vectors) whichever side a batch is padded on.
"""

from __future__ import annotations

import torch
from torch import nn

from gram_scale.encoder.dropout import keyed_dropout
from gram_scale.errors import InputError


def is_causal(config) -> bool:
    """True for a decoder-only model, where each token sees only the tokens before it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    # BERT-likes have causal-LM heads too; only decoder-only families lack a masked-LM one.
    kind = getattr(config, "model_type", "")
    return (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def resolve_pooling(pooling: str, config) -> str:
    """``auto`` -> ``last`` for decoder-only models, ``mean`` otherwise; ``cls`` on a decoder-only
    model is refused."""
    causal = is_causal(config)
    if pooling == "auto":
        return "last" if causal else "mean"
    if pooling == "cls" and causal:
        raise InputError(
            "--pooling",
            None,
            f"cls takes the first token, which in a decoder-only ({config.model_type}) model "
            "sees only itself, so every item would get the same vector; use last or mean",
        )
    return pooling


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left and right padding give the same ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ContentEncoder(nn.Module):
    """HF model + pooling: ``forward(input_ids, attention_mask) -> [rows, dim]``."""

    def __init__(self, model: nn.Module, pooling: str = "auto"):
        super().__init__()
        self.model = model
        self.causal = is_causal(model.config)
        self.pooling = resolve_pooling(pooling, model.config)
        self.dim = int(model.config.hidden_size)

    def forward(self, input_ids, attention_mask, keys: torch.Tensor | None = None):
        extra = {"position_ids": position_ids(attention_mask)} if self.causal else {}
        with keyed_dropout(keys):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, **extra
            ).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens, the first token (``cls``) or the last real token (``last``, for
    left- and right-padded rows alike)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        width = attention_mask.shape[1]
        pos = torch.arange(1, width + 1, device=attention_mask.device)
        last = (attention_mask.long() * pos).argmax(-1)  # the rightmost real token
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
