"""Tiny model folders the benchmark builds (and the tests and the soak reuse): a random 2-layer
BERT with MiniLM's tokenizer, and MiniLM's vocabulary as a decoder tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from gram_scale.encoder.loading import default_encoder_path


def make_tiny_bert(
    folder: str | Path, dropout: float = 0.1, hidden: int = 32, seed: int = 0
) -> Path:
    """A randomly initialised 2-layer BERT folder with the MiniLM tokenizer (tests, tiny bench)."""
    import shutil

    from transformers import BertConfig, BertModel

    from gram_scale.data.load import generate_once

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )

    def write(tmp: Path) -> None:
        BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp))
        src = Path(default_encoder_path())
        for name in (
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ):
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)

    return generate_once(Path(folder), write)


def write_decoder_tokenizer(folder: Path, padding_side: str) -> None:
    """The MiniLM vocabulary as a decoder tokenizer would ship it: no pad token, an eos token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path(), local_files_only=True)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"  # the last token of every text, as many embedding models add
    tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(str(folder))
