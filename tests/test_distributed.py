"""2 CPU processes (gloo) equal 1 process, under DDP, ZeRO-2 and ZeRO-3; global dedup counts."""

from __future__ import annotations

import pytest
import torch
from launching import history, metrics, outputs, run
from tiny import options

from gram_scale.data.load import load_data
from gram_scale.tasks import make_task

STRATEGY_ARGS = {"e2e": ["--strategy", "e2e"], "single": ["--strategy", "single"],
                 "multi": ["--strategy", "multi", "--window", "2"]}  # fmt: skip

# Every run is float64, so summation order (ranks, all-reduce, ZeRO buckets) moves a gradient by
# ~1e-16 of its terms. Without DeepSpeed that is all: after AdamW steps the runs differ by
# < lr * 1e-16 / eps ~ 1e-11 (measured ~1e-14).
DDP_TOL = 1e-9
# DeepSpeed keeps float32 master weights (and ZeRO-3 reduces gradients in float32) whatever the
# parameter dtype: each update rounds parameters to float32, 1 ulp = 1.2e-7 at the model's
# largest weights (~1), differently on another layout, and every later gradient inherits that
# relative noise. AdamW would turn it into full steps on near-zero gradient coordinates; plain SGD
# moves a parameter by exactly lr * gradient, so the noise stays at its size. Measured: no
# parameter differs by more than 1.4e-7 of the model's largest parameter, no item vector by more
# than 9e-7 of the largest vector entry.
ZERO_ARGS = ["--optimizer", "sgd", "--lr-encoder", "0.1", "--lr-cf", "0.1"]
ZERO_PARAM_REL = 2**-20  # 8 float32 ulps of the model's largest parameter
ZERO_VECTOR_REL = 1e-5


def common(kt_dir, tiny_encoder, config: str) -> list[str]:
    # CF dropout is off: its masks come from each rank's RNG, so they depend on the rank layout
    # (encoder dropout is keyed by item and stays on).
    return ["--data", str(kt_dir), "--encoder", str(tiny_encoder), "--max-tokens", "16",
            "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--seq-len", "20",
            "--encoder-batch-size", "16", "--cf-dropout", "0", "--lr-encoder", "1e-3",
            "--precision", "fp64", "--no-progress", "--config", config_path(config),
            *(ZERO_ARGS if config != "none" else [])]  # fmt: skip


def config_path(config: str) -> str:
    return "none" if config == "none" else f"ds_configs/{config}.json"


def worst_excess(one_dir, two_dir, config: str) -> float:
    """Largest difference over its allowance (<= 1 passes) between two runs' exported tensors."""
    a, b = outputs(one_dir), outputs(two_dir)
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    if config == "none":
        return max(diff.values()) / DDP_TOL
    params = [k for k in a if not k.startswith("vec.")]
    param_scale = max(float(a[k].abs().max()) for k in params)
    vector_scale = float(a["vec.vectors"].abs().max())
    return max(max(diff[k] for k in params) / (ZERO_PARAM_REL * param_scale),
               diff["vec.vectors"] / (ZERO_VECTOR_REL * vector_scale))  # fmt: skip


@pytest.fixture(scope="module")
def baseline(kt_dir, tiny_encoder, tmp_path_factory):
    """``baseline(strategy, optimizer_args)``: a 1-process plain-torch run, made once, in this
    process."""
    from gram_scale.config import parse_options
    from gram_scale.trainer import train

    made = {}

    def get(strategy: str, config: str, extra: tuple[str, ...] = ()):
        key = (strategy, config == "none", extra)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"base-{strategy}")
            args = [*common(kt_dir, tiny_encoder, config), *STRATEGY_ARGS[strategy], *extra]
            args[args.index("--config") + 1] = "none"  # same optimizer, no DeepSpeed
            train(parse_options([*args, "--output-dir", str(folder)]))
            made[key] = folder
        return made[key]

    return get


@pytest.mark.parametrize("config", ["none", "zero2", "zero3"])
@pytest.mark.parametrize("strategy", ["e2e", "single", "multi"])
def test_two_processes_equal_one(strategy, config, baseline, kt_dir, tiny_encoder, tmp_path):
    run([*common(kt_dir, tiny_encoder, config), *STRATEGY_ARGS[strategy],
         "--output-dir", str(tmp_path)], processes=2)  # fmt: skip
    one_dir = baseline(strategy, config)
    one, two = metrics(one_dir), metrics(tmp_path)
    assert two["processes"] == 2 and one["processes"] == 1
    assert worst_excess(one_dir, tmp_path, config) <= 1
    assert two["counters"] == one["counters"]
    # AUC is a rank statistic: scores that agree to ~1e-6 only change it on near ties
    assert abs(two["test"]["auc"] - one["test"]["auc"]) < 1e-4
    if strategy == "single":
        assert_global_dedup(history(tmp_path), kt_dir, tiny_encoder)


def test_guard_unkeyed_dropout_breaks_two_equal_one(baseline, kt_dir, tiny_encoder, tmp_path):
    """Guard: with dropout masks drawn from each rank's RNG, 2 processes no longer equal 1, and
    even the ZeRO comparison (the looser one) says so."""
    args = [*common(kt_dir, tiny_encoder, "zero2"), *STRATEGY_ARGS["single"], "--no-keyed-dropout"]
    run([*args, "--output-dir", str(tmp_path)], processes=2)
    one_dir = baseline("single", "zero2", ("--no-keyed-dropout",))
    assert worst_excess(one_dir, tmp_path, "zero2") > 100


def assert_global_dedup(records, kt_dir, tiny_encoder):
    """Summed over ranks, encoder backwards per step = globally unique items of the step,
    fewer than the sum of the ranks' own unique items (the ranks' batches share items)."""
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), batch_size=8, seq_len=20)
    task = make_task(opts, load_data(opts), dim=8)
    assert len(records) == 3
    for rec, batch in zip(records, task.train_batches(0)):
        global_unique = len(torch.unique(batch.items[batch.items >= 0]))
        per_rank = [batch.slice(r, 2).items for r in range(2)]
        rank_sum = sum(len(torch.unique(i[i >= 0])) for i in per_rank)
        assert rec["item_backwards"] == rec["item_forwards"] == rec["unique"] == global_unique
        assert rank_sum > global_unique
