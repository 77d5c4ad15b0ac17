"""The memory workloads llm-1b and llm-3b (gram_scale/bench/llm.py) without training a large
model: the random checkpoint is written shard by shard and loads, the report gives per-rank
peak RSS and bytes per parameter, the command line knows both workloads."""

from __future__ import annotations

import json

import pytest
import torch

from gram_scale.bench.cli import parse_args
from gram_scale.bench.llm import (
    LLM_WORKLOADS,
    count_parameters,
    markdown,
    shard_plan,
    write_random_llama,
)

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
)


def test_shard_plan_keeps_order_and_limit():
    sizes = {"a": 4, "b": 4, "c": 9, "d": 1, "e": 3}
    assert shard_plan(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert shard_plan(sizes, 100) == [list(sizes)]


def test_random_llama_is_written_in_shards_and_loads(tmp_path):
    from transformers import LlamaModel

    write_random_llama(tmp_path, TINY, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    model = LlamaModel.from_pretrained(str(tmp_path), local_files_only=True)
    n = sum(p.numel() for p in model.parameters())
    assert count_parameters(tmp_path) == n == index["metadata"]["total_size"] // 2
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert float(model.norm.weight.float().mean()) == 1.0
    std = float(model.layers[0].mlp.up_proj.weight.float().std())
    assert 0.015 < std < 0.025  # initializer_range 0.02


def test_workloads_and_their_limits():
    one, three = LLM_WORKLOADS["llm-1b"], LLM_WORKLOADS["llm-3b"]
    assert one.rss_limit == 4e9 and three.rss_limit == 9e9
    assert [label for label, _ in three.runs] == ["single", "multi"]
    args = three.train_args(three.runs[1][1])
    assert "--gradient-checkpointing" in args and args[:2] == ["--strategy", "multi"]
    assert "--gradient-checkpointing" not in one.train_args(one.runs[0][1])
    for name in LLM_WORKLOADS:
        assert parse_args(["--workload", name]).workload == name


@pytest.fixture
def fake_result() -> dict:
    run = {
        "label": "single",
        "steps": 3,
        "encoder_updates": 3,
        "seconds_per_step": [40.0, 38.0, 36.0],
        "peak_rss_bytes_per_rank": [8.0e9, 8.2e9],
        "encoder_activation_bytes_rank0": 7 * 2**20,
        "encoder_numerics": {"weights": "bfloat16"},
        "wall_seconds": 170.0,
    }
    return {
        "workload": "llm-3b",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "gpu": None,
            "date": "2026-12-05",
            "load_average_at_start": 1.0,
        },
        "load_average_at_end": 2.0,
        "parameters": 3.2e9,
        "runs": [run, dict(run, label="multi", peak_rss_bytes_per_rank=[8.1e9, 8.3e9])],
        "peak_rss_bytes_per_rank": [8.1e9, 8.3e9],
        "bytes_per_parameter_per_rank": [8.1e9 / 3.2e9, 8.3e9 / 3.2e9],
        "rss_limit_bytes": 9e9,
        "rss_met": True,
    }


def test_report_gives_rss_and_bytes_per_parameter_per_rank(fake_result):
    text = markdown(fake_result)
    assert (
        "| single | 3 (3 encoder updates) | 40.0, 38.0, 36.0 (mean 38.0) | 8.00 GB, 8.20 GB" in text
    )
    assert "| 2.50, 2.56 |" in text  # bytes per parameter per rank
    assert "8.10 GB, 8.30 GB (2.53, 2.59 bytes per parameter); met: at most 9 GB" in text
