"""2 and 4 CPU processes (gloo) equal 1 process, under DDP, ZeRO-2 and ZeRO-3; global dedup
counts; per-rank item traffic against its prediction; a last batch with fewer samples than
ranks; ranks that own no item of any step under ZeRO-3."""

from __future__ import annotations

import math

import pytest
import torch
from launching import history, metrics, outputs, run_many
from tiny import options

from gram_scale.data.load import load_data
from gram_scale.exchange import owner_of
from gram_scale.stats import exchange_rows
from gram_scale.tasks import make_task

# Multi-step: 2 auto mini-batches per full window (from the global touched count), 2 passes,
# each rank's share of a mini-batch in chunks of 4 (several, and padding calls where a rank owns
# fewer), and a 1-step last window closed by ``finish``: the mini-batch sequence must not depend
# on the number of ranks.
# multi-adam: the same with table rows moved by per-row Adam (its state sharded with the rows),
# and the refresh's two replayed batches merged into one CF step (global batches merged before
# each rank takes its slice).
STRATEGY_ARGS = {
    "e2e": ["--strategy", "e2e"],
    "single": ["--strategy", "single"],
    "multi": [
        "--strategy",
        "multi",
        "--window",
        "2",
        "--encoder-epochs",
        "2",
        "--encoder-batch-size",
        "4",
    ],
}
STRATEGY_ARGS["multi-adam"] = [
    *STRATEGY_ARGS["multi"],
    "--table-optimizer",
    "adam",
    "--table-lr",
    "0.05",
    "--cf-refresh-merge",
    "2",
]
# Under ZeRO-3 one mini-batch a window, one pass (the older form; the chunks of 4 stay). ZeRO-3
# adds each chunk's gradient partition into a float32 buffer, so a rank's chunking (which follows
# the world size) rounds each update differently, and a window end's consecutive regression
# steps, each starting from the last one's result, compound it. Measured against 1 process on 2
# ranks: 14x the allowance with 2 auto mini-batches and 2 passes in chunks of 4, 12.8x with 1
# pass, 1.8x with 2 passes in one chunk, 0.25x with 1 pass in one chunk (3.1x on 4 ranks), and
# 0.06x for one step in chunks of 4 (the accumulation itself is right). The mini-batch sequence
# is checked on DDP (exact) and ZeRO-2, 2 and 4 ranks.
ZERO3_MULTI_ARGS = ["--encoder-epochs", "1", "--regress-batch-size", "100000"]

# Every run is float64, so summation order (ranks, all-to-all, ZeRO buckets) moves a gradient by
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
TRAFFIC = ("comm_bytes_sent", "comm_bytes_received")
# padded tokens (and attention pairs) follow each rank's own calls (its owned items, cut by the
# chunk rule)
PER_LAYOUT = (
    *TRAFFIC,
    "padded_forward",
    "padded_backward",
    "attention_pairs_forward",
    "attention_pairs_backward",
)


def common(data_dir, tiny_encoder, config: str, batch_size: int = 8, task: str = "kt") -> list[str]:
    # CF dropout is off: its masks come from each rank's RNG, so they depend on the rank layout
    # (encoder dropout is keyed by item and stays on). A collective that waits for a rank that
    # skipped a call fails after --dist-timeout instead of hanging the suite.
    return [
        "--task",
        task,
        "--data",
        str(data_dir),
        "--encoder",
        str(tiny_encoder),
        "--max-tokens",
        "16",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--batch-size",
        str(batch_size),
        "--seq-len",
        "20",
        "--history-len",
        "10",
        "--cf-heads",
        "2",
        "--encoder-batch-size",
        "16",
        "--cf-dropout",
        "0",
        "--lr-encoder",
        "1e-3",
        "--precision",
        "fp64",
        "--no-progress",
        "--dist-timeout",
        "120",
        "--config",
        config_path(config),
        *(ZERO_ARGS if config != "none" else []),
    ]


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
    return max(
        max(diff[k] for k in params) / (ZERO_PARAM_REL * param_scale),
        diff["vec.vectors"] / (ZERO_VECTOR_REL * vector_scale),
    )


def last_batch_smaller_than(n_samples: int, world: int) -> int:
    """A batch size (>= world) giving 3 batches, the last of 1 or 2 samples (< world)."""
    bs = (n_samples - 1) // 2
    assert bs >= world and 1 <= n_samples - 2 * bs < world
    return bs


@pytest.fixture(scope="module")
def kt4_dir(tmp_path_factory):
    """A small KT set whose answered items never belong to rank 3 of 4 (rank 3 owns no item of
    any training step; it still owns unanswered catalogue items, which evaluation encodes)."""
    from gram_scale.data.synth import write_kt

    folder = tmp_path_factory.mktemp("kt4") / "data"
    write_kt(folder, n_users=14, n_items=48, mean_len=24, n_unused_items=2, seed=3)
    rows = {
        line.split(",", 1)[0]: i
        for i, line in enumerate((folder / "items.csv").read_text().splitlines()[1:])
    }
    lines = (folder / "interactions.csv").read_text().splitlines()
    keep = [ln for ln in lines[1:] if int(owner_of(torch.tensor(rows[ln.split(",")[1]]), 4)) != 3]
    (folder / "interactions.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    return folder


@pytest.fixture(scope="module")
def baseline(tiny_encoder, tmp_path_factory):
    """``baseline(args)``: the same run on 1 process without DeepSpeed, made once, in this
    process."""
    from gram_scale.config import parse_options
    from gram_scale.trainer import train

    made = {}

    def get(args: list[str]):
        args = list(args)
        args[args.index("--config") + 1] = "none"  # same optimizer, no DeepSpeed
        key = tuple(args)
        if key not in made:
            folder = tmp_path_factory.mktemp("base")
            train(parse_options([*args, "--output-dir", str(folder)]))
            made[key] = folder
        return made[key]

    return get


def task_of(data_dir, tiny_encoder, batch_size: int, task: str = "kt"):
    opts = options(
        task=task,
        data=str(data_dir),
        encoder=str(tiny_encoder),
        batch_size=batch_size,
        seq_len=20,
        history_len=10,
    )
    return make_task(opts, load_data(opts), dim=8)


def assert_equal_to_one(args, many_dir, processes, config, baseline) -> dict:
    """The run of ARGS in MANY_DIR (on N processes) equals the same run on 1 process."""
    one_dir = baseline(args)
    one, many = metrics(one_dir), metrics(many_dir)
    assert many["processes"] == processes and one["processes"] == 1
    assert worst_excess(one_dir, many_dir, config) <= 1
    without = {k: v for k, v in many["counters"].items() if k not in PER_LAYOUT}
    assert without == {k: v for k, v in one["counters"].items() if k not in PER_LAYOUT}
    # Every metric, scored by each rank on its share and combined: AUC and accuracy are rank and
    # threshold statistics, so scores that agree to ~1e-6 only move them on near ties.
    for split in ("valid", "test"):
        assert many[split].keys() == one[split].keys()
        for key, value in one[split].items():
            if isinstance(value, float) and not math.isnan(value):
                assert abs(many[split][key] - value) < 1e-4, (split, key)
            else:
                assert many[split][key] == value or math.isnan(many[split][key]), (split, key)
    return many


def layout(processes: int, kt_dir, kt4_dir, tiny_encoder):
    """(data, batch size) of the 2- or 4-process runs."""
    if processes == 2:
        return kt_dir, 8
    bs = last_batch_smaller_than(len(task_of(kt4_dir, tiny_encoder, 8).train_windows), 4)
    return kt4_dir, bs


def launch_runs(config: str, processes: int, kt_dir, kt4_dir, news_dir, tiny_encoder) -> dict:
    """The runs that share the (config, processes) launch, by name: each strategy of
    ``test_processes_equal_one``, and the other tests' runs of that config and process count."""
    data, bs = layout(processes, kt_dir, kt4_dir, tiny_encoder)
    shared = common(data, tiny_encoder, config, bs)
    runs = {s: [*shared, *a] for s, a in STRATEGY_ARGS.items()}
    if config == "zero3":
        runs["multi"] += ZERO3_MULTI_ARGS  # the last of a repeated flag wins
        runs["multi-adam"] += ZERO3_MULTI_ARGS
    if (config, processes) == ("zero3", 4):
        runs["news"] = news_args(news_dir, tiny_encoder)
    if (config, processes) == ("zero2", 2):
        runs["guard"] = guard_args(kt_dir, tiny_encoder)
    return runs


@pytest.fixture(scope="module")
def launched(kt_dir, kt4_dir, news_dir, tiny_encoder, tmp_path_factory):
    """``launched(config, processes)[name]``: (args, output folder, failure or None) of that run
    of ``launch_runs``. A (config, processes)'s runs train one after another in one launch,
    made once: a launch's start-up costs more than a run's training."""
    made = {}

    def get(config: str, processes: int) -> dict:
        if (config, processes) not in made:
            args = launch_runs(config, processes, kt_dir, kt4_dir, news_dir, tiny_encoder)
            out = {k: tmp_path_factory.mktemp(f"{k}-{config}-{processes}") for k in args}
            failures = run_many([[*args[k], "--output-dir", str(out[k])] for k in args], processes)
            made[config, processes] = {k: (args[k], out[k], f) for k, f in zip(args, failures)}
        return made[config, processes]

    return get


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("config", ["none", "zero2", "zero3"])
@pytest.mark.parametrize("strategy", list(STRATEGY_ARGS))
def test_processes_equal_one(
    strategy, config, processes, launched, baseline, kt_dir, kt4_dir, tiny_encoder
):
    """On 4 processes the data make the last global batch smaller than the ranks (a rank trains
    on an empty slice) and leave rank 3 owning no item of any step (under ZeRO-3 it still has
    to make every collective encoder call)."""
    data, bs = layout(processes, kt_dir, kt4_dir, tiny_encoder)
    task = task_of(data, tiny_encoder, bs)
    args, out, failure = launched(config, processes)[strategy]
    assert failure is None, failure
    many = assert_equal_to_one(args, out, processes, config, baseline)
    # ZeRO-3 builds the encoder as partitions (zero.Init): no rank ever held the whole model
    assert many["encoder_numerics"]["built_partitioned"] == (config == "zero3")
    batches = list(task.train_batches(0))[:3]
    if processes == 4:
        assert len(batches) == 3 and len(batches[-1]) < 4
        used = torch.cat([b.items[b.items >= 0] for b in batches])
        assert not (owner_of(used, 4) == 3).any()
    if strategy == "single":
        assert_global_dedup(history(out), batches, processes)
    assert_traffic(
        many, history(out), batches, processes, strategy, dim=outputs(out)["vec.vectors"].shape[1]
    )


def news_args(news_dir, tiny_encoder) -> list[str]:
    """News, ZeRO-3, Single-step, with a last global batch smaller than 4 ranks."""
    bs = last_batch_smaller_than(len(task_of(news_dir, tiny_encoder, 8, "news").samples), 4)
    return [*common(news_dir, tiny_encoder, "zero3", bs, task="news"), *STRATEGY_ARGS["single"]]


def test_news_empty_slice_equals_one(launched, baseline):
    """News on 4 processes, ZeRO-3, Single-step: the last global batch has fewer samples than
    ranks, so the user encoder of some rank sees 0 rows; the run trains and matches 1 process."""
    args, out, failure = launched("zero3", 4)["news"]
    assert failure is None, failure
    many = assert_equal_to_one(args, out, 4, "zero3", baseline)
    assert many["steps"] == 3


def guard_args(kt_dir, tiny_encoder) -> list[str]:
    """2 processes, ZeRO-2, Single-step, dropout masks from each rank's RNG."""
    return [*common(kt_dir, tiny_encoder, "zero2"), *STRATEGY_ARGS["single"], "--no-keyed-dropout"]


def test_guard_unkeyed_dropout_breaks_two_equal_one(launched, baseline):
    """Guard: with dropout masks drawn from each rank's RNG, 2 processes no longer equal 1, and
    even the ZeRO comparison (the looser one) says so."""
    args, out, failure = launched("zero2", 2)["guard"]
    assert failure is None, failure
    assert worst_excess(baseline(args), out, "zero2") > 100


def assert_global_dedup(history, batches, world: int):
    """Summed over ranks, encoder backwards per step = globally unique items of the step,
    fewer than the sum of the ranks' own unique items (the ranks' batches share items)."""
    assert len(history) == len(batches) == 3
    shared = []
    for rec, batch in zip(history, batches):
        global_unique = len(torch.unique(batch.items[batch.items >= 0]))
        per_rank = [batch.slice(r, world).items for r in range(world)]
        rank_sum = sum(len(torch.unique(i[i >= 0])) for i in per_rank)
        assert rec["item_backwards"] == rec["item_forwards"] == rec["unique"] == global_unique
        shared.append(rank_sum > global_unique)
    assert shared[0]  # a full batch


def assert_traffic(metrics_: dict, history: list, batches, world: int, strategy: str, dim: int):
    """Each rank's item bytes per step are within 2x of (rows it asked for + rows it served +
    the gradients of both) x D x 8 bytes (float64); E2E moves no items at all."""
    totals = metrics_["counters"]
    for key in TRAFFIC:
        assert totals[key] == [sum(h[key][r] for h in history) for r in range(world)]
    if strategy == "e2e":
        assert all(v == 0 for key in TRAFFIC for v in totals[key])
        return
    ratios = []
    for rec, batch in zip(history, batches):
        asked, served = exchange_rows(batch, world)
        for r in range(world):
            predicted = 2 * int(asked[r] + served[r]) * dim * 8
            measured = rec["comm_bytes_sent"][r] + rec["comm_bytes_received"][r]
            if predicted == 0:
                assert measured <= 2 * 8 * world  # the row counts only
                continue
            ratios.append(measured / predicted)
    assert ratios and all(0.5 <= x <= 2 for x in ratios), ratios
