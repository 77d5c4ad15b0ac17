"""Under ZeRO-3 the encoder is built as partitions and its checkpoint read module by module
(gram_scale/encoder/partitioned.py): which checkpoints are read so, and on 2 ranks the gathered
weights equal the checkpoint's, single-file or sharded, with or without the causal-LM prefix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from launching import ROOT, run
from safetensors.torch import load_file, save_file

from gram_scale.encoder.partitioned import checkpoint_files, checkpoint_shapes, key_map

PROBE = ROOT / "tests" / "zero3_load_probe.py"


def causal_lm_copy(src: Path, dst: Path) -> Path:
    """``src`` as a causal-LM checkpoint stores its body: keys under ``model.``, an LM head the
    encoder does not have, two shards and an index."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = {f"model.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def without_one_key(src: Path, dst: Path) -> Path:
    """``src`` with one layer norm's weight missing from its checkpoint."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["norm.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_checkpoint_files_and_key_map(tiny_llama, tmp_path):
    single = checkpoint_files(tiny_llama)
    assert single == [tiny_llama / "model.safetensors"]
    sharded = causal_lm_copy(tiny_llama, tmp_path / "causal")
    assert [p.name for p in checkpoint_files(sharded)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert checkpoint_files(tmp_path) == []  # no weights: transformers' loading decides
    shapes = {k: v[0] for k, v in checkpoint_shapes(single).items()}
    assert key_map(shapes, checkpoint_shapes(single), "model") == {k: k for k in shapes}
    # under the prefix, the LM head ignored
    assert key_map(shapes, checkpoint_shapes(checkpoint_files(sharded)), "model") == {
        k: f"model.{k}" for k in shapes
    }
    missing = dict(shapes, **{"extra.weight": [2, 2]})
    assert key_map(missing, checkpoint_shapes(single), "model") is None
    other = dict(shapes, **{"norm.weight": [7]})
    assert key_map(other, checkpoint_shapes(single), "model") is None


@pytest.fixture(scope="module")
def loaded(tiny_llama, tiny_gpt2, tiny_encoder, tmp_path_factory) -> dict[str, str]:
    """``{folder: probe line}`` from one 2-rank launch loading each folder under ZeRO-3."""
    tmp = tmp_path_factory.mktemp("partitioned")
    folders = [
        tiny_llama,
        causal_lm_copy(tiny_llama, tmp / "causal"),
        tiny_gpt2,
        tiny_encoder,
        without_one_key(tiny_llama, tmp / "missing"),
    ]
    r = run([str(f) for f in folders], processes=2, script=PROBE, timeout=300)
    lines = [line for line in r.stdout.splitlines() if "read_by_module=" in line]
    return {line.split()[0]: line for line in lines}


@pytest.mark.parametrize("which", ["llama", "causal", "gpt2", "bert"])
def test_read_module_by_module_equals_the_checkpoint(
    which, loaded, tiny_llama, tiny_gpt2, tiny_encoder
):
    folder = {
        "llama": tiny_llama,
        "gpt2": tiny_gpt2,
        "bert": tiny_encoder,
    }.get(which)
    line = next(
        v
        for k, v in loaded.items()
        if (k.endswith("/causal") if folder is None else k == str(folder))
    )
    assert "read_by_module=True partitioned=True max_diff=0.0 unchecked=0" in line, line


def test_a_checkpoint_that_does_not_match_is_left_to_transformers(loaded):
    line = next(v for k, v in loaded.items() if k.endswith("/missing"))
    # still built partitioned (transformers' own zero.Init loading), every stored weight read
    assert "read_by_module=False partitioned=True max_diff=0.0 unchecked=1" in line, line
