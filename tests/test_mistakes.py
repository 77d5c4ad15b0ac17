"""Every mistake a user can make is refused up front in one line (exit 2), or handled correctly:
one test per case, through the real command line (in this process where it can be, for speed).

Each refusal asserts the exit code, exactly one line on stderr, no traceback, and an output
folder left as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from launching import run, tiny_run_args

from gram_scale.checkpoint import list_checkpoints, verify
from gram_scale.cli import main
from gram_scale.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED
from gram_scale.history import read_history


def common(kt_dir, encoder) -> list[str]:
    return tiny_run_args(kt_dir, encoder)


def snapshot(folder: Path) -> dict | None:
    """Every path under a folder with its size and modification time (None: no folder)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": (folder.stat().st_size, folder.stat().st_mtime_ns)}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def cli(capsys, args: list[str]) -> tuple[int, str, str]:
    """``launch/train.py ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], lines[0]


def refused(capsys, args: list[str], out: Path, *parts: str) -> str:
    """Run, expect exit 2 with one line holding every part, the output folder unchanged."""
    before = snapshot(out)
    code, stdout, err = cli(capsys, [*args, "--output-dir", str(out)])
    assert code == EXIT_INPUT_ERROR, (code, stdout, err)
    assert_one_line(err, *parts)
    assert snapshot(out) == before
    return err


# ---- checkpoints and a finished run to resume from or collide with ------------------------
@pytest.fixture(scope="module")
def finished(kt_dir, tiny_encoder, tmp_path_factory) -> Path:
    """A finished 2-step run with exports and a checkpoint (single strategy, no DeepSpeed)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = [
        *common(kt_dir, tiny_encoder),
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--export",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    return out


def test_exports_share_the_json_files_permissions(finished):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    assert stat.S_IMODE((finished / "metrics.json").stat().st_mode) == want
    for name in ("cf_model.safetensors", "item_vectors.safetensors", "encoder/model.safetensors"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == want, name


# ---- output folder --------------------------------------------------------------------------
def test_output_dir_a_file_or_not_writable_is_refused(capsys, kt_dir, tiny_encoder, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    args = [*common(kt_dir, tiny_encoder), "--max-steps", "1"]
    refused(capsys, args, a_file, "--output-dir", "is a file, not a folder")
    refused(capsys, args, a_file / "sub", "--output-dir", "is a file")
    if os.geteuid() == 0:  # root writes where permission bits forbid it: use read-only /sys
        locked = Path("/sys/gram-scale-test-output")
        try:
            locked.mkdir()
        except OSError:
            pass
        else:
            locked.rmdir()
            pytest.skip("no read-only place to test with")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        locked = parent / "out"
    refused(capsys, args, locked, "--output-dir", "is not writable")


def test_output_dir_with_an_earlier_run(capsys, finished, kt_dir, tiny_encoder, tmp_path):
    args = [*common(kt_dir, tiny_encoder), "--max-steps", "1"]
    refused(
        capsys,
        args,
        finished,
        "--output-dir",
        "holds an earlier run",
        "metrics.json",
        "--overwrite-output-dir",
        "--resume latest",
    )
    # --overwrite-output-dir clears the earlier run's outputs, and nothing else
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("keep me\n")
    code, stdout, err = cli(capsys, [*args, "--overwrite-output-dir", "--output-dir", str(out)])
    assert code == 0 and err == "", err
    left = sorted(p.name for p in out.iterdir())
    assert left == ["history.jsonl", "metrics.json", "notes.txt", "options.json"], (
        left
    )  # no encoder/
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


# ---- DeepSpeed config -----------------------------------------------------------------------
def _zero2(**changes) -> dict:
    cfg = json.loads(Path("ds_configs/zero2.json").read_text())
    for key, value in changes.items():
        section = cfg
        *parents, last = key.split(".")
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = value
    return cfg


@pytest.mark.parametrize(
    "changes, parts",
    [
        ({"zero_optimization.stage": 4}, ["zero_optimization.stage", "got 4"]),
        ({"fp16.enabled": True}, ["fp16.enabled", "needs a GPU"]),
        ({"train_batch_size": "64"}, ["train_batch_size", "positive integer", "'64'"]),
        ({"optimizer": {"type": "AdamQ", "params": {}}}, ["optimizer.type", "'AdamQ'"]),
        ({"train_batch_size": 64}, ["train_batch_size", "64 is not", "x 1 process"]),
    ],
    ids=["stage-4", "fp16-on-cpu", "string-batch", "unknown-optimizer", "batch-arithmetic"],
)
def test_deepspeed_config_semantics_refused(
    changes, parts, capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch
):
    if "fp16.enabled" in changes and torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(_zero2(**changes)))
    args = [*common(kt_dir, tiny_encoder), "--config", str(cfg), "--encoder-batch-size", "16"]
    refused(capsys, args, tmp_path / "out", str(cfg), *parts)


@pytest.mark.parametrize(
    "changes, problem",
    [
        (
            {"zero_optimization.stage3_max_live_parameters": "many"},
            "zero_optimization.stage3_max_live_parameters: must be a valid integer",
        ),
        (
            {"zero_optimization.offload_optimizer": {"device": "cpu", "pin_mem": True}},
            "zero_optimization.offload_optimizer.pin_mem: DeepSpeed has no such setting",
        ),
    ],
    ids=["string-count", "unknown-nested-key"],
)
def test_deepspeed_config_checked_by_deepspeeds_models(
    changes, problem, capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch
):
    """What DeepSpeed's own config models refuse (a string where a count goes, a key DeepSpeed
    does not know inside an offload section) is one line: the file, the key path, the problem."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(_zero2(**changes)))
    args = [*common(kt_dir, tiny_encoder), "--config", str(cfg), "--encoder-batch-size", "16"]
    refused(capsys, args, tmp_path / "out", f"{cfg}: {problem}")


def test_deepspeed_config_against_precision_and_optimizer(
    capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(_zero2(**{"bf16.enabled": True})))
    args = [*common(kt_dir, tiny_encoder), "--config", str(cfg), "--precision", "fp64"]
    refused(capsys, args, tmp_path / "out", str(cfg), "bf16.enabled", "--precision fp64")
    offload = "ds_configs/zero2_offload.json"  # names an AdamW optimizer
    args = [*common(kt_dir, tiny_encoder), "--config", offload, "--optimizer", "sgd"]
    refused(capsys, args, tmp_path / "out", offload, "optimizer", "--optimizer sgd")


# ---- encoder folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_tokenizer(tiny_encoder, tmp_path_factory) -> Path:
    """The tiny encoder's config and weights without its tokenizer files."""
    folder = tmp_path_factory.mktemp("enc-no-tok") / "bert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_encoder / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_t5(tiny_encoder, tmp_path_factory) -> Path:
    """A tiny random T5 (encoder-decoder) folder, with a tokenizer so only its kind is wrong."""
    from transformers import T5Config, T5Model

    folder = tmp_path_factory.mktemp("enc-t5") / "t5"
    config = T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5Model(config).save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_encoder / name, folder / name)
    return folder


def test_encoder_folder_refused(capsys, kt_dir, tiny_encoder, no_tokenizer, tiny_t5, tmp_path):
    out = tmp_path / "out"
    refused(capsys, common(kt_dir, no_tokenizer), out, str(no_tokenizer), "no tokenizer files")
    refused(capsys, common(kt_dir, tiny_t5), out, str(tiny_t5), "t5 is an encoder-decoder")
    # the tiny BERT has 64 positions
    refused(
        capsys,
        [*common(kt_dir, tiny_encoder), "--max-tokens", "100"],
        out,
        "--max-tokens",
        "100 is more than the 64 token positions",
    )


def test_damaged_weights_are_named_before_training(capsys, kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "out"
    cut = tmp_path / "cut"
    shutil.copytree(tiny_encoder, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a download that stopped short
    refused(capsys, common(kt_dir, cut), out, str(weights), "damaged weights file", "truncated")
    weights.write_bytes(b"\x05")
    refused(capsys, common(kt_dir, cut), out, str(weights), "damaged weights file")
    # a sharded checkpoint whose index names a shard that is not there
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_encoder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
            "pooler.dense.weight": "model-00002-of-00002.safetensors",
        }
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(
        capsys,
        common(kt_dir, sharded),
        out,
        str(sharded / "model-00002-of-00002.safetensors"),
        "missing",
        "model.safetensors.index.json",
    )
    # torch's zip format, cut short
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_encoder, pickled)
    (pickled / "model.safetensors").unlink()
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny_encoder / "model.safetensors")), pickled / "pytorch_model.bin")
    data = (pickled / "pytorch_model.bin").read_bytes()
    (pickled / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    refused(
        capsys,
        common(kt_dir, pickled),
        out,
        str(pickled / "pytorch_model.bin"),
        "damaged weights file",
    )


@pytest.fixture(scope="module")
def small_vocab(tiny_encoder, tmp_path_factory) -> Path:
    """A tiny BERT with a 1,000-row embedding table beside the 30,522-token MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("enc-small-vocab") / "bert"
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_encoder / name, folder / name)
    return folder


def test_tokenizer_larger_than_the_embedding_table_is_refused(
    capsys, kt_dir, small_vocab, tmp_path
):
    refused(
        capsys,
        common(kt_dir, small_vocab),
        tmp_path / "out",
        str(small_vocab / "tokenizer.json"),
        "30522 tokens",
        "1000 rows of the model's embedding table",
    )


@pytest.mark.parametrize("max_tokens", ["1", "2"])
def test_max_tokens_below_the_special_tokens_is_refused(
    max_tokens, capsys, kt_dir, tiny_encoder, tmp_path
):
    # BERT's tokenizer adds [CLS] and [SEP]: 1 was silently ignored, 2 left no text at all
    refused(
        capsys,
        [*common(kt_dir, tiny_encoder), "--max-tokens", max_tokens],
        tmp_path / "out",
        "--max-tokens",
        f"{max_tokens} leaves no room for text",
        "adds 2 special tokens",
        "at least 3",
    )


# ---- numbers, folders and trackers ----------------------------------------------------------
@pytest.mark.parametrize(
    "extra, parts",
    [
        (["--lr-cf", "inf"], ["--lr-cf", "finite", "inf"]),
        (["--lr-encoder", "inf"], ["--lr-encoder", "finite", "inf"]),
        (["--weight-decay", "inf"], ["--weight-decay", "finite", "inf"]),
        (["--lora-alpha", "0"], ["--lora-alpha", "must be positive, got 0.0"]),
        (["--lora-alpha", "-8"], ["--lora-alpha", "must be positive, got -8.0"]),
        (["--seed", "99999999999999999999"], ["--seed", "0..4294967295", "99999999999999999999"]),
        (["--seed", "-1"], ["--seed", "0..4294967295", "-1"]),
    ],
    ids=[
        "lr-cf-inf",
        "lr-encoder-inf",
        "weight-decay-inf",
        "lora-alpha-0",
        "lora-alpha-negative",
        "seed-huge",
        "seed-negative",
    ],
)
def test_numbers_out_of_range_refused(extra, parts, capsys, kt_dir, tiny_encoder, tmp_path):
    refused(capsys, [*common(kt_dir, tiny_encoder), *extra], tmp_path / "out", *parts)


def test_the_largest_seed_trains(capsys, kt_dir, tiny_encoder, tmp_path):
    # Multi-step derives its regression shuffle from the seed: the largest one must fit too
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        [
            *common(kt_dir, tiny_encoder),
            "--seed",
            "4294967295",
            "--strategy",
            "multi",
            "--window",
            "1",
            "--max-steps",
            "2",
            "--output-dir",
            str(out),
        ],
    )
    assert code == 0 and err == "", err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_empty_output_dir_is_refused(capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it wrote into the current folder: wrote /metrics.json
    before = snapshot(tmp_path)
    code, stdout, err = cli(capsys, [*common(kt_dir, tiny_encoder), "--output-dir", ""])
    assert code == EXIT_INPUT_ERROR, (code, stdout, err)
    assert_one_line(err, "--output-dir", "is empty")
    assert snapshot(tmp_path) == before


def test_cache_dir_that_is_a_file_is_refused(capsys, kt_dir, tiny_encoder, tmp_path):
    a_file = tmp_path / "cache"
    a_file.write_text("not a folder\n")
    out = tmp_path / "out"
    refused(
        capsys,
        [*common(kt_dir, tiny_encoder), "--cache-dir", str(a_file)],
        out,
        "--cache-dir",
        str(a_file),
        "is a file",
    )
    refused(
        capsys,
        [*common(kt_dir, tiny_encoder), "--cache-dir", str(a_file / "sub")],
        out,
        "--cache-dir",
        f"{a_file} is a file",
    )


def test_tracker_that_is_not_installed_is_refused(
    capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch
):
    import sys

    for name in ("tensorboard", "tensorboardX"):  # as if neither were installed
        monkeypatch.setitem(sys.modules, name, None)
    refused(
        capsys,
        [*common(kt_dir, tiny_encoder), "--report-to", "tensorboard"],
        tmp_path / "out",
        "--report-to",
        "tensorboard is not installed",
        "pip install tensorboard",
    )


def test_launcher_cpu_mode_with_deepspeed_is_refused(
    capsys, kt_dir, tiny_encoder, tmp_path, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` sets
    args = [*common(kt_dir, tiny_encoder), "--config", "ds_configs/zero2.json"]
    refused(capsys, args, tmp_path / "out", "--cpu", "turns DeepSpeed off", "ds_configs/zero2.json")
    # the launcher itself, as the user typed it
    out = tmp_path / "launched"
    r = run([*args, "--output-dir", str(out)], processes=2, check=False, launcher_args=["--cpu"])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert lines and "error: --cpu: accelerate launch --cpu turns DeepSpeed off" in lines[0], (
        r.stderr[-3000:]
    )
    assert "AttributeError" not in r.stderr and not out.exists()


def test_contradictory_mind_impression_is_refused_with_file_and_line(
    capsys, news_dir, tiny_encoder, tmp_path
):
    data = tmp_path / "news"
    shutil.copytree(news_dir, data)
    behaviors = data / "train" / "behaviors.tsv"
    rows = behaviors.read_text().splitlines()
    fields = rows[2].split("\t")
    news_id, label = fields[4].split()[0].rsplit("-", 1)
    fields[4] += f" {news_id}-{1 - int(label)}"  # shown once clicked and once not
    rows[2] = "\t".join(fields)
    behaviors.write_text("\n".join(rows) + "\n")
    args = [
        "--task",
        "news",
        "--data",
        str(data),
        "--encoder",
        str(tiny_encoder),
        "--max-tokens",
        "16",
        "--history-len",
        "10",
        "--cf-heads",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--no-export",
    ]
    refused(
        capsys,
        args,
        tmp_path / "out",
        f"{behaviors}:3:",
        repr(news_id),
        "both clicked and not clicked",
    )


# ---- flags that cannot work together --------------------------------------------------------
@pytest.mark.parametrize(
    "extra, parts",
    [
        (["--lora", "--freeze-encoder"], ["--lora", "--freeze-encoder"]),
        (["--precision", "bf16", "--freeze-encoder"], ["--precision", "--freeze-encoder trains"]),
        (["--overwrite-output-dir", "--resume", "latest"], ["--overwrite-output-dir", "--resume"]),
    ],
    ids=["lora-frozen", "bf16-frozen", "overwrite-resume"],
)
def test_flag_conflicts_refused(extra, parts, capsys, kt_dir, tiny_encoder, tmp_path):
    refused(capsys, [*common(kt_dir, tiny_encoder), *extra], tmp_path / "out", *parts)


# ---- resume ---------------------------------------------------------------------------------
def test_resume_from_a_different_run_names_what_differs(
    capsys, finished, kt_dir, tiny_encoder, tiny_encoder_nodrop, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    (_, ckpt), *_ = list_checkpoints(finished / "checkpoints")
    same = [*common(kt_dir, tiny_encoder), "--max-steps", "3", "--resume", str(ckpt)]
    refused(
        capsys,
        [*same, "--strategy", "multi"],
        finished,
        "cannot resume, made by a different run",
        "strategy: checkpoint single, this run multi",
    )
    refused(
        capsys,
        [*same, "--encoder", str(tiny_encoder_nodrop)],
        finished,
        "encoder: checkpoint bert hidden 32 (config.json sha256",
    )
    refused(
        capsys,
        [*same, "--config", "ds_configs/zero2.json"],
        finished,
        "deepspeed: checkpoint none, this run ZeRO stage 2, fp32",
    )
    refused(
        capsys,
        [*same, "--task", "kt", "--cf-layers", "1"],
        finished,
        "cf_model: checkpoint kt, 2 LSTM layers, this run kt, 1 LSTM layers",
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is made
    refused(capsys, same, finished, "processes: checkpoint 1, this run 2")


def test_resume_with_other_data_seed_batch_or_split_is_refused(
    capsys, finished, kt_dir, tiny_encoder, tmp_path
):
    (_, ckpt), *_ = list_checkpoints(finished / "checkpoints")
    args = [*common(kt_dir, tiny_encoder), "--max-steps", "3", "--resume", str(ckpt)]
    refused(capsys, [*args, "--seed", "1"], finished, "seed: checkpoint 0, this run 1")
    refused(capsys, [*args, "--batch-size", "4"], finished, "batch_size: checkpoint 8, this run 4")
    refused(
        capsys,
        [*args, "--valid-frac", "0.2"],
        finished,
        "split: checkpoint users valid 0.1, test 0.1; cold items 0.1, this run users valid 0.2",
    )
    # the same files elsewhere are the same data; one changed row is not
    moved = tmp_path / "moved"
    shutil.copytree(kt_dir, moved)
    code, stdout, err = cli(
        capsys, [*args, "--data", str(moved), "--output-dir", str(tmp_path / "copy")]
    )
    assert code == 0 and f"resumed from {ckpt} at step 2" in stdout, err
    edited = moved / "interactions.csv"
    rows = edited.read_text().splitlines()
    user, item, correct, *rest = rows[5].split(",")
    rows[5] = ",".join([user, item, str(1 - int(correct)), *rest])
    edited.write_text("\n".join(rows) + "\n")
    err = refused(
        capsys,
        [*args, "--data", str(moved)],
        finished,
        "cannot resume, made by a different run",
        "data interactions.csv: checkpoint sha256",
        "this run sha256",
    )
    assert "data items.csv" not in err  # only the changed file is named


def test_resume_from_a_wrong_path(capsys, finished, kt_dir, tiny_encoder, tmp_path):
    args = [*common(kt_dir, tiny_encoder), "--max-steps", "3"]
    out = tmp_path / "out"
    refused(
        capsys,
        [*args, "--resume", str(finished / "metrics.json")],
        out,
        "cannot resume: is a file, not a checkpoint folder",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, [*args, "--resume", str(empty)], out, "cannot resume: not a checkpoint folder")
    refused(
        capsys,
        [*args, "--resume", str(finished)],
        out,
        "not a checkpoint folder",
        "--resume latest",
    )
    (_, ckpt), *_ = list_checkpoints(finished / "checkpoints")
    for manifest in ([], {"files": ["model.bin"]}, {"files": {"model.bin": 3}}):
        bad = tmp_path / "bad-manifest"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(ckpt, bad)
        (bad / "manifest.json").write_text(json.dumps(manifest))
        refused(capsys, [*args, "--resume", str(bad)], out, "cannot resume")


# ---- legitimate inputs handled correctly ----------------------------------------------------
def test_more_negatives_than_shown_are_drawn_without_replacement(
    capsys, news_dir, tiny_encoder, tmp_path
):
    from tiny import options

    from gram_scale.data.load import load_data
    from gram_scale.tasks import make_task

    opts = options(task="news", data=str(news_dir), encoder=str(tiny_encoder), negatives=1000)
    data = load_data(opts)
    task = make_task(opts, data, dim=8)
    h = opts.history_len
    shown = {imp_i: imp for imp_i, imp in enumerate(data.train)}
    batch = next(task.train_batches(0))
    assert batch.items.shape[1] <= h + 1 + max(len(imp.labels) for imp in shown.values())
    for row in batch.items[:, h:]:
        cands = row[row >= 0].tolist()
        assert len(cands) == len(set(cands)) > 1  # every shown non-click once, never repeated
    out = tmp_path / "news"
    code, stdout, err = cli(
        capsys,
        [
            "--task",
            "news",
            "--data",
            str(news_dir),
            "--encoder",
            str(tiny_encoder),
            "--negatives",
            "1000",
            "--max-tokens",
            "16",
            "--history-len",
            "10",
            "--cf-heads",
            "2",
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--no-progress",
            "--no-export",
            "--output-dir",
            str(out),
        ],
    )
    assert code == 0 and err == "", err
    for step in read_history(out):  # with replacement, 8 samples drew 8,000 negatives
        assert step["loss"] == step["loss"] and step["occurrences"] <= 8 * (10 + 5)


def test_empty_evaluation_splits_are_said_and_recorded(
    capsys, kt_dir, news_dir, tiny_encoder, tmp_path
):
    one_user = tmp_path / "one-user"
    one_user.mkdir()
    shutil.copy(kt_dir / "items.csv", one_user / "items.csv")
    rows = (kt_dir / "interactions.csv").read_text().splitlines()
    first = rows[1].split(",")[0]
    (one_user / "interactions.csv").write_text(
        "\n".join([rows[0], *[r for r in rows[1:] if r.split(",")[0] == first]]) + "\n"
    )
    out = tmp_path / "kt"
    args = common(one_user, tiny_encoder)
    code, stdout, err = cli(capsys, [*args, "--max-steps", "1", "--output-dir", str(out)])
    assert code == 0 and err == "", err
    assert "final valid skipped: no users in the valid split" in stdout.splitlines()
    assert "final test  skipped: no users in the test split" in stdout.splitlines()
    m = json.loads((out / "metrics.json").read_text())
    assert m["valid"] == {"skipped": "no users in the valid split"}
    assert m["test"] == {"skipped": "no users in the test split"}

    no_clicks = tmp_path / "no-clicks"
    shutil.copytree(news_dir, no_clicks)
    dev = no_clicks / "dev" / "behaviors.tsv"
    dev.write_text(dev.read_text().replace("-1", "-0"))
    out = tmp_path / "news"
    code, stdout, err = cli(
        capsys,
        [
            "--task",
            "news",
            "--data",
            str(no_clicks),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "16",
            "--history-len",
            "10",
            "--cf-heads",
            "2",
            "--batch-size",
            "8",
            "--max-steps",
            "1",
            "--no-progress",
            "--no-export",
            "--output-dir",
            str(out),
        ],
    )
    assert code == 0 and err == "", err
    said = [line for line in stdout.splitlines() if "skipped" in line]
    assert said == [
        "final valid skipped: no impressions with a click in the valid split",
        "final test  skipped: no impressions with a click in the test split",
    ]
    m = json.loads((out / "metrics.json").read_text())
    assert m["valid"] == {"skipped": "no impressions with a click in the valid split"}


# ---- Ctrl-C ---------------------------------------------------------------------------------
def test_stop_request_flags_first_signal_and_lets_a_later_one_through():
    from gram_scale.signals import StopRequest

    # Python's own Ctrl-C handler before, whatever a library loaded by an earlier test installed
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest(grace_s=0.5) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.received == signal.SIGINT and stop.name == "SIGINT"
            signal.raise_signal(signal.SIGINT)  # the launcher's echo of the same Ctrl-C: ignored
            time.sleep(0.6)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def _own_lines(stdout: str) -> list[str]:
    """stdout lines that are not the run's own (a library's warnings would show here)."""
    own = ("kt: ", "resumed from ", "final valid ", "final test ", "wrote ", "epoch ")
    return [line for line in stdout.splitlines() if not line.startswith(own)]


def test_ctrl_c_stops_after_the_step_with_a_resumable_checkpoint(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    args = [
        *common(kt_dir, tiny_encoder),
        "--config",
        "ds_configs/zero2.json",
        "--save-every",
        "3",
        "--output-dir",
        str(out),
    ]
    # SIGINT arrives before step 2 (0-based); step 2 finishes, a checkpoint of 3 steps is kept
    r = run([*args, "--max-steps", "8"], check=False, extra_env={"GRAM_FAULT_KILL": "0:2:SIGINT"})
    assert r.returncode == EXIT_INTERRUPTED, r.stderr[-3000:]
    assert_one_line(r.stderr, "stopped by SIGINT after step 3", "step-00000003", "--resume latest")
    assert _own_lines(r.stdout) == [], r.stdout  # no library warnings on stdout
    ((step, folder),) = list_checkpoints(out / "checkpoints")
    assert step == 3 and verify(folder) is None and not (out / "metrics.json").exists()
    r = run([*args, "--max-steps", "4", "--resume", "latest"])
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert _own_lines(r.stdout) == [], r.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(kt_dir, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    r = run(
        [
            *common(kt_dir, tiny_encoder),
            "--save-every",
            "5",
            "--max-steps",
            "8",
            "--output-dir",
            str(out),
        ],
        processes=2,
        check=False,
        timeout=300,
        extra_env={"GRAM_FAULT_KILL": "1:1:SIGINT"},
    )
    assert r.returncode != 0  # the launcher's own report of the ranks' exit 130 follows
    assert "stopped by SIGINT on another process after step 2" in r.stderr, r.stderr[-3000:]
    ((step, folder),) = list_checkpoints(out / "checkpoints")
    assert step == 2 and verify(folder) is None
