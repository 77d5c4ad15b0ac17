"""Saving a trained encoder as a plain Hugging Face folder with its tokenizer and pooling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gram_scale.encoder.model import ContentEncoder

POOLING_FILE = "gram_pooling.json"


def save_encoder(encoder: ContentEncoder, tokenizer, folder: str | Path, state_dict=None) -> None:
    """Write a folder that ``AutoModel.from_pretrained`` loads, plus the tokenizer and pooling."""
    folder = Path(folder)
    if state_dict is None:
        encoder.model.save_pretrained(str(folder), safe_serialization=True)
    else:
        # A state dict gathered from ZeRO shards: write it ourselves, since save_pretrained
        # under an active ZeRO-3 config renames LayerNorm weights to legacy gamma/beta.
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        encoder.model.config.save_pretrained(str(folder))
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    (folder / POOLING_FILE).write_text(json.dumps({"pooling": encoder.pooling}) + "\n")
