"""End-to-end runs of the trainer on tiny data: learning, exports, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import options

from gram_scale.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learn_dirs(tmp_path_factory):
    from gram_scale.data.synth import write_kt, write_mind

    base = tmp_path_factory.mktemp("learn")
    write_kt(base / "kt", n_users=120, n_items=60, mean_len=40, n_unused_items=4, seed=1)
    write_mind(
        base / "news",
        n_users=150,
        n_news=100,
        impressions_per_user=3,
        n_candidates=5,
        history_len=10,
        n_dev_only_news=6,
        seed=1,
    )
    return base


@pytest.mark.parametrize("task", ["kt", "news"])
def test_e2e_learns_and_beats_frozen_encoder(task, learn_dirs, tiny_encoder, tmp_path):
    common = dict(
        task=task, data=str(learn_dirs / task), encoder=str(tiny_encoder), epochs=4, batch_size=16
    )
    tuned = train(options(strategy="e2e", output_dir=str(tmp_path / "tuned"), **common))
    frozen = train(
        options(
            strategy="single", freeze_encoder=True, output_dir=str(tmp_path / "frozen"), **common
        )
    )
    tuned, frozen = tuned["test"]["auc"], frozen["test"]["auc"]
    assert tuned > 0.7, tuned  # chance is 0.5
    assert tuned > frozen + 0.03, (tuned, frozen)


def test_export_reproduces_item_vectors(kt_dir, tiny_encoder, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    from gram_scale.data.kt import load_kt
    from gram_scale.encoder.model import pool

    out = tmp_path / "run"
    metrics = train(
        options(
            data=str(kt_dir),
            encoder=str(tiny_encoder),
            export=True,
            output_dir=str(out),
            max_steps=3,
        )
    )
    assert json.loads((out / "metrics.json").read_text())["steps"] == metrics["steps"] == 3
    assert json.loads((out / "options.json").read_text())["max_steps"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]
    with safe_open(str(out / "item_vectors.safetensors"), "pt") as f:
        saved = f.get_tensor("vectors")
        ids = json.loads(f.metadata()["ids"])
    catalogue = load_kt(kt_dir).catalogue
    assert ids == catalogue.ids and saved.shape[0] == len(catalogue)  # cold items included
    model = AutoModel.from_pretrained(str(out / "encoder")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "encoder"))
    pooling = json.loads((out / "encoder" / "gram_pooling.json").read_text())["pooling"]
    enc = tok(catalogue.texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        vecs = pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling)
    assert float((vecs - saved).abs().max()) < 1e-5
    # the encoder really was fine-tuned: the export differs from the initial weights
    init = AutoModel.from_pretrained(str(tiny_encoder))
    w = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(init.state_dict()[w], model.state_dict()[w])
    with safe_open(str(out / "cf_model.safetensors"), "pt") as f:
        assert "lstm.weight_ih_l0" in f.keys()


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_help_lists_every_flag_with_default():
    r = _cli("--help")
    assert r.returncode == 0
    for flag in (
        "--task",
        "--data",
        "--encoder",
        "--strategy",
        "--epochs",
        "--batch-size",
        "--lr-encoder",
        "--lr-cf",
        "--seed",
        "--output-dir",
        "--config",
        "--window",
        "--regress-batch-size",
        "--eval-every",
        "--save-best",
    ):
        assert flag in r.stdout
    assert "(default: single)" in " ".join(r.stdout.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "two"], "--epochs: invalid int value: 'two'"),
        (["--strategy", "fast"], "--strategy: must be one of e2e, single, multi, got 'fast'"),
        (["--window", "1X"], "--window: expected a number of steps"),
        (["--lr-cf", "-1"], "--lr-cf: must be positive"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder: data folder not found"),
        (["--config", "/nonexistent.json"], "/nonexistent.json: DeepSpeed config file not found"),
        (["--lr-schedule", "step"], "--lr-schedule: must be one of constant, linear, cosine"),
        (["--max-grad-norm", "-1"], "--max-grad-norm: must be 0 or more, got -1.0"),
        (["--target-lr", "-2"], "--target-lr: must be 0 or more, got -2.0"),
        (["--target-distance", "inf"], "--target-distance: must be 0 or more (and finite)"),
        (["--cf-refresh", "some"], "--cf-refresh: expected a number >= 0 or auto, got 'some'"),
        (["--cf-refresh-merge", "0"], "--cf-refresh-merge: must be at least 1, got 0"),
        (["--table-optimizer", "lion"], "--table-optimizer: must be one of sgd, adam"),
        (["--regress-lr", "x"], "--regress-lr: must be one of auto, sqrt, linear, same"),
        (["--last-window", "none"], "--last-window: must be one of cf, update"),
        (["--regress-batch-size", "abc"], "--regress-batch-size: expected a positive number"),
        (["--eval-every", "-1"], "--eval-every: must be 0 or more, got -1"),
        (["--eval-every", "abc"], "--eval-every: invalid int value: 'abc'"),
        (["--save-best", "--no-export"], "--save-best: has nothing to save with --no-export"),
    ],
)
def test_cli_bad_flag_is_one_line_exit_2(args, message, tmp_path):
    r = _cli(*args, "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_bad_data_file_names_file_and_line(kt_dir, tiny_encoder, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "items.csv").write_text((kt_dir / "items.csv").read_text())
    rows = (kt_dir / "interactions.csv").read_text().splitlines()
    rows[3] = rows[3].split(",")[0] + ",no_such_item,1," + rows[3].split(",")[3]
    (bad / "interactions.csv").write_text("\n".join(rows) + "\n")
    r = _cli(
        "--data", str(bad), "--encoder", str(tiny_encoder), "--output-dir", str(tmp_path / "out")
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{bad / 'interactions.csv'}:4:" in lines[0] and "no_such_item" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", ""])
def test_regress_batch_size_refused(value):
    from gram_scale.config import parse_options
    from gram_scale.errors import InputError

    with pytest.raises(InputError) as err:
        parse_options(["--regress-batch-size", value])
    assert str(err.value) == (
        f"--regress-batch-size: expected a positive number of items or auto, got {value!r}"
    )


def test_regress_batch_size_accepted():
    from gram_scale.config import parse_options

    assert parse_options([]).regress_batch() is None  # auto, the default
    assert parse_options(["--regress-batch-size", "AUTO"]).regress_batch() is None
    assert parse_options(["--regress-batch-size", "12"]).regress_batch() == 12
