"""Checks of an encoder folder before any weight is read: its config, tokenizer files, the
framing of its weight files, and the tokenizer against the model and ``--max-tokens``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gram_scale.errors import InputError

# Files one of which every tokenizer AutoTokenizer can load offline comes with; without any of
# them transformers quietly builds a 5-token tokenizer that maps every word to [UNK].
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
)
# These models count positions from padding_idx + 1: two of max_position_embeddings are unusable.
_OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "longformer",
    "data2vec-text",
    "xmod",
    "roberta-prelayernorm",
    "mpnet",
    "ibert",
    "luke",
}


def check_encoder_folder(path: str | os.PathLike, max_tokens: int) -> dict:
    """Refuse a folder that cannot serve as the item encoder, reading only its small files;
    returns its identity (path, config hash, type, hidden size) for checkpoints, and its
    parsed ``config``."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(folder, None, "not a Hugging Face model folder (no config.json)")
    raw = config_file.read_bytes()
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            config_file, None, f"not valid JSON ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(cfg, dict):
        raise InputError(config_file, None, "not a model config (expected a JSON object)")
    model_type = str(cfg.get("model_type", "unknown"))
    if cfg.get("is_encoder_decoder"):
        raise InputError(
            folder,
            None,
            f"{model_type} is an encoder-decoder model; gram-scale "
            "needs an encoder-only one (BERT, MiniLM, RoBERTa ...)",
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            folder,
            None,
            "no tokenizer files (expected one of "
            f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer into "
            "the model folder",
        )
    check_weights(folder)
    positions = cfg.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        if model_type in _OFFSET_POSITIONS:
            positions -= int(cfg.get("pad_token_id") or 1) + 1
        if max_tokens > positions:
            raise InputError(
                "--max-tokens",
                None,
                f"{max_tokens} is more than the {positions} "
                f"token positions of the encoder {folder}",
            )
    hidden = cfg.get("hidden_size", cfg.get("dim", cfg.get("d_model")))
    return {
        "path": str(folder.resolve()),
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        "model_type": model_type,
        "hidden_size": hidden,
        "config": cfg,
    }


# The weight files transformers loads, in its order of preference: a single file or the shards a
# ``*.index.json`` lists.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def check_weights(folder: Path) -> None:
    """Refuse weights that would fail to load, or load a part: a missing file or shard, a
    truncated or damaged one (safetensors: the header against the file's length; torch zip
    archives: the central directory). Reads headers only, never the tensors."""
    for single, index_name in WEIGHT_FILES:
        if (folder / single).is_file():
            files = [folder / single]
            break
        index = folder / index_name
        if index.is_file():
            files = _shards(index)
            break
    else:
        raise InputError(
            folder,
            None,
            "no model weights (expected model.safetensors, "
            "pytorch_model.bin or a sharded *.index.json)",
        )
    for path in files:
        problem = (
            _safetensors_problem(path) if path.suffix == ".safetensors" else _bin_problem(path)
        )
        if problem:
            raise InputError(path, None, f"damaged weights file: {problem}")


def _shards(index: Path) -> list[Path]:
    """The shard files a weights index lists, each present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise InputError(
            index,
            None,
            "not a weights index (expected JSON with a weight_map of tensor name -> shard file)",
        ) from None
    for name in names:
        if not (index.parent / str(name)).is_file():
            raise InputError(
                index.parent / str(name), None, f"missing: a shard that {index.name} lists"
            )
    return [index.parent / str(name) for name in names]


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, the
    tensors' bytes exactly filling the rest), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return f"{size} bytes, too short for its header (truncated?)"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "unreadable header"
    try:
        end = max(
            (int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"),
            default=0,
        )
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return "malformed header (tensors without data_offsets)"
    if 8 + length + end != size:
        return f"{size} bytes, its header describes {8 + length + end} (truncated or damaged)"
    return None


def _bin_problem(path: Path) -> str | None:
    """What is wrong with a torch checkpoint: a zip archive (torch >= 1.6) must have its central
    directory and every member inside the file; an older pickle is left to the loader."""
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return None if magic[:1] == b"\x80" else "neither a zip archive nor a pickle"
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{info.filename} runs past the end of the file (truncated?)"
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{size} bytes, not a complete zip archive ({exc}; truncated?)"
    return None


def check_tokenizer(path: str | os.PathLike, max_tokens: int, config: dict) -> None:
    """Refuse a tokenizer that cannot serve the encoder: one that does not load, whose ids run
    past the model's embedding table, or whose special tokens leave ``--max-tokens`` no room
    for text (truncation then silently keeps the whole text, or only the special tokens)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            folder, None, f"cannot load the tokenizer: {str(exc).splitlines()[0]}"
        ) from None
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0 and len(tokenizer) > vocab:
        name = next((n for n in TOKENIZER_FILES if (folder / n).is_file()), "tokenizer")
        raise InputError(
            folder / name,
            None,
            f"the tokenizer has {len(tokenizer)} tokens, more "
            f"than the {vocab} rows of the model's embedding table (config.json "
            "vocab_size): its larger ids would fail mid-run",
        )
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_tokens <= specials:
        raise InputError(
            "--max-tokens",
            None,
            f"{max_tokens} leaves no room for text: the "
            f"tokenizer of {folder} adds {specials} special tokens to every text; "
            f"use at least {specials + 1}",
        )
