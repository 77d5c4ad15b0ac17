"""Under ZeRO-3: the encoder built as partitions, its weights read one module at a time.

transformers' own ZeRO-3 loading builds the model inside ``deepspeed.zero.Init`` (each rank
holds only its partition of every parameter) but then reads the whole checkpoint into one
state dict on rank 0 before scattering it: rank 0 holds a full copy of the weights (memory
mapped, so counted in its resident memory) on top of its partition. Here the model is built the
same way, without initialising weights that are read next, and the checkpoint is read tensor by
tensor: for each module, its parameters are gathered, rank 0 copies the module's tensors from
the safetensors files into them, and leaving the gather broadcasts and re-partitions them. No
rank holds more than one module's full weights besides its partitions.

Only safetensors checkpoints whose every parameter is found by name (optionally under the base
model's prefix, as a ``...ForCausalLM`` checkpoint stores its body) with the model's shape are
read this way; anything else (old ``.bin`` files, renamed keys) is left to transformers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


def zero3_enabled() -> bool:
    """Whether transformers would build a model inside ``deepspeed.zero.Init`` now (accelerate
    sets this up for a stage-3 DeepSpeed config)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without DeepSpeed integration
        return False
    return bool(is_deepspeed_zero3_enabled())


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: its index's shards, or ``model.safetensors``;
    empty when it has neither."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(shards))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[list[int], Path]]:
    """``{key: (shape, file)}`` from the safetensors headers alone (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = (list(f.get_slice(key).get_shape()), path)
    return out


def key_map(
    model_shapes: dict[str, list[int]], stored: dict[str, tuple[list[int], Path]], prefix: str
) -> dict[str, str] | None:
    """``{model key: checkpoint key}`` for every model parameter or persistent buffer, or None
    when one is missing or stored with another shape. A key is looked up as it is and under
    the base model's ``prefix`` (``model.`` for a Llama causal-LM checkpoint); checkpoint keys
    the model lacks (an LM head) are ignored."""
    out = {}
    for key, shape in model_shapes.items():
        for name in (key, f"{prefix}.{key}" if prefix else None):
            if name is not None and name in stored:
                if stored[name][0] != shape:
                    return None
                out[key] = name
                break
        else:
            return None
    return out


def _expected_shapes(config, kwargs: dict) -> tuple[dict[str, list[int]], str]:
    """The model's parameter and persistent-buffer shapes and its base prefix, from a copy built
    on the meta device (no memory, no collective)."""
    from transformers import AutoModel

    from gram_scale.encoder.lora import _zero3_off

    with _zero3_off(), torch.device("meta"):
        meta = _from_config(AutoModel, config, kwargs)
    shapes = {k: list(v.shape) for k, v in meta.state_dict().items()}
    return shapes, getattr(meta, "base_model_prefix", "") or ""


def _from_config(auto, config, kwargs: dict):
    try:  # no pooler head, as in loading.py: we pool ourselves
        return auto.from_config(config, add_pooling_layer=False, **kwargs)
    except TypeError:
        return auto.from_config(config, **kwargs)


def _init_contexts():
    """What transformers enters to build a model under ZeRO-3, minus its weight initialisation
    (the weights are read next), or None where this transformers lacks one of them."""
    try:
        import deepspeed
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import (
            deepspeed_config,
            prevent_arange_dtype_change,
        )
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # another transformers: its own loading is used
        return None
    return [
        no_init_weights(),
        prevent_arange_dtype_change(),  # RoPE frequencies stay float32 inside zero.Init
        deepspeed.zero.Init(config_dict_or_path=deepspeed_config()),
        set_zero3_state(),  # tells from_config that zero.Init is already on
    ]


def load_partitioned(folder: Path, config, dtype: torch.dtype, attention: str):
    """The model of ``folder`` built partitioned under ZeRO-3 and loaded module by module, or
    None where it cannot be (no safetensors, keys that do not match: transformers loads it)."""
    from transformers import AutoModel

    dtype = dtype or torch.get_default_dtype()  # what from_pretrained builds for None
    files = checkpoint_files(folder)
    if not files:
        return None
    kwargs = {"dtype": dtype, "attn_implementation": attention}
    contexts = _init_contexts()
    if contexts is None:
        return None
    shapes, prefix = _expected_shapes(config, kwargs)
    stored = checkpoint_shapes(files)
    mapping = key_map(shapes, stored, prefix)
    if mapping is None:
        return None
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        model = _from_config(AutoModel, config, kwargs)
    read_weights(model, {k: (stored[v][1], v) for k, v in mapping.items()})
    model.eval()  # as from_pretrained leaves it
    return model


def read_weights(model: torch.nn.Module, where: dict[str, tuple[Path, str]]) -> None:
    """Copy each parameter and persistent buffer from ``where`` (``{model key: (file, key)}``),
    module by module: a module's parameters are gathered, rank 0 reads them one tensor at a
    time, and the gather's end broadcasts them from rank 0 and re-partitions them. Buffers are
    not partitioned: every rank reads its own."""
    import deepspeed
    from safetensors import safe_open

    rank = torch.distributed.get_rank()

    def read(key: str) -> torch.Tensor:
        path, name = where[key]
        with safe_open(str(path), "pt") as f:  # opened per tensor: no mapping outlives it
            return f.get_tensor(name)

    with torch.no_grad():
        for prefix, module in model.named_modules():
            dot = f"{prefix}." if prefix else ""
            params = [(dot + n, p) for n, p in module.named_parameters(recurse=False)]
            if params:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                    if rank == 0:
                        for key, p in params:
                            p.copy_(read(key))
            for n, b in module.named_buffers(recurse=False):
                if dot + n in where and b is not None:
                    b.copy_(read(dot + n))
