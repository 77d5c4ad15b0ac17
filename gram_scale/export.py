"""Outputs a user takes downstream: encoder folder, CF weights, item vectors, metrics, options.

Everything is first written into a hidden folder inside the output folder and then moved into
place, so an interrupted run never leaves a half-written export behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from gram_scale.encoder import save_encoder, save_lora_encoder

ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapter"
CF_FILE = "cf_model.safetensors"
VECTORS_FILE = "item_vectors.safetensors"
METRICS_FILE = "metrics.json"
OPTIONS_FILE = "options.json"


def publish(output_dir: str | Path, write) -> None:
    """Call ``write(tmp_folder)``, then move each entry it made into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        write(tmp)
        for entry in sorted(tmp.iterdir()):
            dest = out / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    """Pretty JSON with NaN written as null."""
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def _clean(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def export_run(folder: Path, encoder, tokenizer, encoder_state, cf_model, ids: list[str],
               vectors: torch.Tensor, metrics: dict, opts) -> None:  # fmt: skip
    """Write every output of a finished run into ``folder``."""
    if encoder is not None:
        if opts.lora:
            save_lora_encoder(opts.resolved_encoder(), opts, tokenizer, encoder_state,
                              folder / ENCODER_DIR, folder / ADAPTER_DIR, encoder.pooling)  # fmt: skip
        else:
            save_encoder(encoder, tokenizer, folder / ENCODER_DIR, state_dict=encoder_state)
        cf_state = {k: v.detach().cpu().contiguous() for k, v in cf_model.state_dict().items()}
        save_file(cf_state, str(folder / CF_FILE))
        save_file(
            {"vectors": vectors.detach().float().cpu().contiguous()},
            str(folder / VECTORS_FILE),
            metadata={"ids": json.dumps(ids)},
        )
    write_json(folder / METRICS_FILE, metrics)
    (folder / OPTIONS_FILE).write_text(opts.to_json() + "\n")
