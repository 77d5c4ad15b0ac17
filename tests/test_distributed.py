"""2 CPU processes (gloo) equal 1 process, under DDP, ZeRO-2 and ZeRO-3; global dedup counts."""

from __future__ import annotations

import pytest
import torch
from launching import max_diff, metrics, outputs, run
from tiny import options

from gram_scale.data.load import load_data
from gram_scale.tasks import make_task

TOL = 1e-4  # float32; in practice the differences are ~1e-6 (summation order of gradients)
STRATEGY_ARGS = {"e2e": ["--strategy", "e2e"], "single": ["--strategy", "single"],
                 "multi": ["--strategy", "multi", "--window", "2"]}  # fmt: skip


def common(kt_dir, tiny_encoder) -> list[str]:
    # CF dropout is off: its masks come from each rank's RNG, so they depend on the rank layout
    # (encoder dropout is keyed by item and stays on).
    return ["--data", str(kt_dir), "--encoder", str(tiny_encoder), "--max-tokens", "16",
            "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--seq-len", "20",
            "--encoder-batch-size", "16", "--cf-dropout", "0", "--lr-encoder", "1e-3",
            "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def baselines(kt_dir, tiny_encoder, tmp_path_factory):
    """1-process runs of each strategy (plain torch, no DeepSpeed), in this process."""
    from gram_scale.config import parse_options
    from gram_scale.trainer import train

    out = {}
    for name, args in STRATEGY_ARGS.items():
        folder = tmp_path_factory.mktemp(f"base-{name}")
        train(parse_options([*common(kt_dir, tiny_encoder), *args, "--config", "none",
                             "--output-dir", str(folder)]))  # fmt: skip
        out[name] = folder
    return out


@pytest.mark.parametrize("config", ["none", "zero2", "zero3"])
@pytest.mark.parametrize("strategy", ["e2e", "single", "multi"])
def test_two_processes_equal_one(strategy, config, baselines, kt_dir, tiny_encoder, tmp_path):
    cfg = "none" if config == "none" else f"ds_configs/{config}.json"
    run([*common(kt_dir, tiny_encoder), *STRATEGY_ARGS[strategy], "--config", cfg,
         "--output-dir", str(tmp_path)], processes=2)  # fmt: skip
    one, two = metrics(baselines[strategy]), metrics(tmp_path)
    assert two["processes"] == 2 and one["processes"] == 1
    assert max_diff(outputs(baselines[strategy]), outputs(tmp_path)) < TOL
    assert two["counters"] == one["counters"]
    assert abs(two["test"]["auc"] - one["test"]["auc"]) < 1e-4
    if strategy == "single":
        assert_global_dedup(two["history"], kt_dir, tiny_encoder)


def assert_global_dedup(history, kt_dir, tiny_encoder):
    """Summed over ranks, encoder backwards per step = globally unique items of the step,
    fewer than the sum of the ranks' own unique items (the ranks' batches share items)."""
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), batch_size=8, seq_len=20)
    task = make_task(opts, load_data(opts), dim=8)
    assert len(history) == 3
    for rec, batch in zip(history, task.train_batches(0)):
        global_unique = len(torch.unique(batch.items[batch.items >= 0]))
        per_rank = [batch.slice(r, 2).items for r in range(2)]
        rank_sum = sum(len(torch.unique(i[i >= 0])) for i in per_rank)
        assert rec["item_backwards"] == rec["item_forwards"] == rec["unique"] == global_unique
        assert rank_sum > global_unique
