"""DeepSpeed offload configs and bf16 train on 2 CPU ranks; W&B logs offline with no key."""

from __future__ import annotations

import json
import re

import pytest
import torch
from launching import history, run, run_many

CONFIGS = [
    ("zero2_offload", "fp32"),
    ("zero3_offload", "fp32"),
    ("zero2", "bf16"),
    # ZeRO-3 builds the encoder inside zero.Init, in the dtype the config says at that time
    ("zero3_offload", "bf16"),
]


@pytest.fixture(scope="module")
def trained(kt_dir, tiny_encoder, tmp_path_factory) -> dict:
    """``{(config, precision): (output folder, failure or None)}``: each of CONFIGS trained on 2
    CPU ranks, all in one launch (each run starts a fresh Accelerator and DeepSpeed engine)."""
    out = {c: tmp_path_factory.mktemp(f"{c[0]}-{c[1]}") for c in CONFIGS}
    runs = [
        [
            "--data",
            str(kt_dir),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--seq-len",
            "20",
            "--lr-cf",
            "3e-3",
            "--config",
            f"ds_configs/{config}.json",
            "--precision",
            precision,
            "--no-progress",
            "--output-dir",
            str(folder),
        ]
        for (config, precision), folder in out.items()
    ]
    return {c: (out[c], failure) for c, failure in zip(CONFIGS, run_many(runs, processes=2))}


@pytest.mark.parametrize("config, precision", CONFIGS)
def test_offload_configs_train_with_falling_loss(config, precision, trained):
    folder, failure = trained[config, precision]
    assert failure is None, failure
    numerics = json.loads((folder / "metrics.json").read_text())["encoder_numerics"]
    # the shipped configs accumulate gradients in float32, bf16 weights included
    assert numerics["grad_accum"] == "float32"
    if precision == "bf16":  # the engine really ran the encoder in bf16
        from safetensors.torch import load_file

        weights = load_file(str(folder / "encoder" / "model.safetensors"))
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
        assert numerics["weights"] == numerics["compute"] == "bfloat16"
    losses = [h["loss"] for h in history(folder)]
    third = len(losses) // 3
    assert third >= 4
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.01, losses


def test_wandb_offline_run_holds_logged_keys(kt_dir, tiny_encoder, tmp_path):
    r = run(
        [
            "--data",
            str(kt_dir),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "16",
            "--epochs",
            "2",
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--log-every",
            "1",
            "--report-to",
            "wandb",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ],
        extra_env={"WANDB_MODE": "", "WANDB_API_KEY": ""},
    )
    assert r.stdout.count("logging offline") == 1
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = set(re.findall(rb"(?:train|valid|test)/[a-z_@0-9]+", runs[0].read_bytes()))
    for key in (
        b"train/loss",
        b"train/items_per_s",
        b"train/item_backwards",
        b"train/occurrence_unique_ratio",
        b"train/comm_bytes_sent",
        b"train/comm_bytes_received",
        b"valid/auc",
        b"test/auc",
    ):
        assert key in logged, logged
