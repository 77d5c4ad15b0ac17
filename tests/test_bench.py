"""``gram_scale.bench`` end to end on the tiny workload: outputs, schema, and every strategy's
encoder counters recomputed from the batches the runs trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gram_scale.bench.report import encoder_flops, markdown, summarise, targets
from gram_scale.bench.workloads import UNSORTED, WORKLOADS
from gram_scale.config import Options, parse_window
from gram_scale.data.load import load_data
from gram_scale.history import read_history
from gram_scale.stats import compute
from gram_scale.strategies.multi import window_steps
from gram_scale.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "strategy",
    "window",
    "extrapolated",
    "steps",
    "epochs_done",
    "time_per_epoch_s",
    "time_per_epoch_s_repeats",
    "speedup",
    "occurrences_per_epoch",
    "item_forwards_per_epoch",
    "item_backwards_per_epoch",
    "counters",
    "occurrence_unique_ratio",
    "occurrences_per_backward",
    "peak_rss_bytes",
    "encoder_activation_bytes",
    "cuda_peak_bytes",
    "valid",
    "test",
    "curve",
    "runs",
    "frozen",
    "seeds",
    "valid_per_seed",
    "test_per_seed",
}
RUNS = WORKLOADS["tiny"].runs
LABELS = [run.label for run in RUNS]


def _bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # One thread per run: the test checks counts, not speed, and shares 2 cores with other tests.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "gram_scale.bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """One run of the tiny workload into a temporary folder and cache."""
    tmp = tmp_path_factory.mktemp("bench")
    r = _bench(
        "--workload",
        "tiny",
        "--out",
        str(tmp / "out"),
        "--cache-dir",
        str(tmp / "cache"),
        "--repeats",
        "1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out", json.loads((tmp / "out" / "results.json").read_text()), r


def test_outputs_and_schema(tiny):
    out, res, proc = tiny
    assert (out / "results.md").is_file()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["order"] == LABELS and sorted(res["strategies"]) == sorted(LABELS)
    for name, row in res["strategies"].items():
        assert ROW_FIELDS <= row.keys(), (name, ROW_FIELDS - row.keys())
        assert row["extrapolated"] is False and len(row["runs"]) == 1
        assert {"dir", "argv", "train_seconds", "wall_seconds", "other_cores"} <= row["runs"][
            0
        ].keys()
        assert row["epochs_done"] == res["epochs"] == 2
        assert row["time_per_epoch_s"] > 0 and row["peak_rss_bytes"] > 0
        # a frozen encoder keeps no graph
        assert (row["encoder_activation_bytes"] > 0) == (not row["frozen"])
        assert row["cuda_peak_bytes"] is None
        assert 0 <= row["valid"]["auc"] <= 1 and 0 <= row["test"]["auc"] <= 1
        assert len(row["curve"]) == 2  # one valid point per epoch
    assert res["strategies"]["e2e"]["speedup"] == 1.0
    m = res["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["date"]
    assert {"python", "torch", "transformers", "accelerate", "deepspeed"} <= m["versions"].keys()
    # single, 1E speed, 1E AUC vs e2e, e2e vs frozen, the gain each window keeps, memory per
    # multi, 1E overhead
    assert len(res["targets"]) == 2 + 1 + 1 + 3 + 3 + 1
    assert all(t["met"] in (True, False) for t in res["targets"])
    rows = res["strategies"]
    for name in ("multi 10", "multi 0.5E", "multi 1E"):
        (kept,) = [t["kept"] for t in res["targets"] if t["name"].startswith(f"{name} keeps")]
        for split in ("valid", "test"):
            auc = {r: rows[r][split]["auc"] for r in (name, "e2e", "frozen")}
            want = (auc[name] - auc["frozen"]) / (auc["e2e"] - auc["frozen"])
            assert kept[split]["mean"] == pytest.approx(want)
            assert kept[split]["per_seed"] == [pytest.approx(want)]
    assert res["bound"]["bound_e_over_c"] > 0
    o = res["overhead"]  # one 1E epoch in process: its parts add up to the step time
    assert o["window"] == "1E" and o["steps"] == res["steps_per_epoch"]
    assert o["encoder_s"] > 0 and o["cf_s"] > 0 and 0 <= o["other_share"] < 1
    assert o["encoder_s"] + o["cf_s"] + o["other_s"] == pytest.approx(o["step_s"])
    md = (out / "results.md").read_text()
    assert "Targets:" in md and "e / c" in md
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(LABELS)  # header + one row per strategy, printed at the end
    # the predicted ratios are gram_scale.stats on the very options the runs used
    stats = compute(Options(**res["options"]))
    assert res["predicted"] == {"R_batch": stats["R_batch"], "R_epoch": stats["R_epoch"]}
    assert res["steps_per_epoch"] == stats["batches"]


def _step_items(opts: Options) -> list[set[int]]:
    """The item rows of every training step, as the trainer batches them."""
    task = make_task(opts, load_data(opts), dim=8 * opts.cf_heads)  # the CF model is unused
    steps = []
    for epoch in range(opts.epochs):
        for batch in task.train_batches(epoch):
            steps.append(batch.items[batch.items >= 0])
    return steps


def test_counters_match_definitions(tiny):
    _, res, _ = tiny
    opts = Options(**res["options"])
    steps = _step_items(opts)
    spe = res["steps_per_epoch"]
    occ = [len(s) for s in steps]
    uniq = [len(torch.unique(s)) for s in steps]
    for name, row in res["strategies"].items():
        metrics = json.loads((Path(row["runs"][0]["dir"]) / "metrics.json").read_text())
        hist, c = read_history(row["runs"][0]["dir"]), metrics["counters"]
        assert len(hist) == len(steps) == row["steps"] == 2 * spe, name
        assert [h["occurrences"] for h in hist] == occ, name
        assert [h["unique"] for h in hist] == uniq, name
        assert c["occurrences"] == sum(occ) and c["unique"] == sum(uniq)
        # the table's per-epoch figures are the run's totals over its epochs
        assert row["item_backwards_per_epoch"] == c["item_backwards"] / 2
        assert row["item_forwards_per_epoch"] == c["item_forwards"] / 2
        fwd, bwd = [h["item_forwards"] for h in hist], [h["item_backwards"] for h in hist]
        if row["strategy"] == "e2e":  # every occurrence encoded and back-propagated
            assert fwd == occ and bwd == occ
            for e in range(2):
                assert sum(bwd[e * spe : (e + 1) * spe]) == sum(occ[e * spe : (e + 1) * spe])
            assert c["item_forwards"] == c["item_backwards"] == c["occurrences"]
        elif row["frozen"]:  # each item encoded once per run, when a step first needs it
            seen, new = set(), []
            for k, items in enumerate(steps):
                if k == spe:  # the first epoch's evaluation encoded every catalogue item
                    seen = set(range(int(torch.cat(steps).max()) + 1))
                new.append(len(set(items.tolist()) - seen))
                seen |= set(items.tolist())
            assert fwd == new and bwd == [0] * len(uniq) and sum(new) < sum(uniq)
            assert c["item_backwards"] == 0 and row["occurrences_per_backward"] is None
        elif row["strategy"] == "single":  # each unique item of the step once
            assert fwd == uniq and bwd == uniq
            assert c["item_forwards"] == c["item_backwards"] == c["unique"]
            assert c["item_backwards"] == round(c["occurrences"] / row["occurrence_unique_ratio"])
        else:
            _check_multi(row["window"], spe, steps, hist, c)


def _check_multi(window: str, spe: int, steps: list, hist: list[dict], c: dict) -> None:
    """A window's items are encoded at its first step, or at the previous window's end when the
    CF refresh (on by default) fills them early for its replay; at the window's end every item
    it touched is re-encoded and back-propagated once, and the replay encodes the items of its
    batches that the next window lacks; the run's last window (--last-window cf, the default)
    trains the CF model only: no encoder call at its end or at finish."""
    w = window_steps(parse_window(window), spe)
    refresh = min(20, w)  # --cf-refresh auto
    windows = [steps[k : k + w] for k in range(0, len(steps), w)]
    assert len(windows) > 1, window
    items = [set(torch.cat(ws).tolist()) for ws in windows]
    updated = [k for k, ws in enumerate(windows) if len(ws) == w and k < len(windows) - 1]
    expected = []
    for k, ws in enumerate(windows):
        fill = [len(items[k]) if k == 0 else 0] + [0] * (len(ws) - 1)
        if k in updated:  # a full window ends in a step: regression, then the refresh
            nxt = items[k + 1]
            replay = set(torch.cat(ws[-refresh:]).tolist())
            fill[-1] += len(items[k]) + len(nxt) + len(replay - nxt)
        expected += fill
    window_sizes = [len(items[k]) for k in updated]
    ends = [(step + 1) % w == 0 and step // w in updated for step in range(len(steps))]
    assert [h["encoder_updated"] for h in hist] == ends, window
    assert [h["item_forwards"] for h in hist] == expected, window
    assert [h["item_backwards"] for h in hist] == [
        len(items[step // w]) if end else 0 for step, end in enumerate(ends)
    ], window
    assert c["item_backwards"] == sum(window_sizes)  # finish had nothing to close
    assert c["item_forwards"] == sum(expected)
    if window == "1E":  # one window per epoch: the first epoch's distinct items, then CF only
        assert window_sizes == [len(torch.unique(torch.cat(steps[:spe])))]


def test_windows_differ(tiny):
    _, res, _ = tiny
    spe = res["steps_per_epoch"]
    sizes = [window_steps(parse_window(r.window), spe) for r in RUNS if r.strategy == "multi"]
    assert len(set(sizes)) == 3 and spe % 10 != 0  # 10-step windows straddle epochs


def _fake_run(steps: int, seconds: float, auc: float, seed: int = 0) -> dict:
    counters = {
        "occurrences": 30 * steps,
        "unique": 10 * steps,
        "item_forwards": 30 * steps,
        "item_backwards": 30 * steps,
    }
    metrics = {
        "steps": steps,
        "train_seconds": seconds,
        "counters": counters,
        "occurrence_unique_ratio": 3.0,
        "encoder_peak_activation_bytes": 1000 * steps,
        "cuda_peak_bytes": None,
        "valid": {"auc": auc},
        "test": {"auc": auc},
        "epochs": [{"train_seconds": seconds, "valid": {"auc": auc}}],
    }
    return {
        "metrics": metrics,
        "rss": 1 << 20,
        "wall": seconds + 1,
        "other_cores": 0.0,
        "dir": "d",
        "argv": [],
        "seed": seed,
    }


def test_seeds_average_accuracy_and_time_takes_the_median():
    runs = [
        _fake_run(10, 1.0, 0.70, seed=0),
        _fake_run(10, 3.0, 0.60, seed=0),
        _fake_run(10, 2.0, 0.80, seed=1),
    ]
    row = summarise(runs, 10, extrapolated=False)
    assert row["seeds"] == [0, 1]
    # each seed's first repeat: (0.70 + 0.80) / 2; the second repeat of seed 0 is timing only
    assert row["test"]["auc"] == pytest.approx(0.75) and row["valid"]["auc"] == pytest.approx(0.75)
    assert row["test_per_seed"] == [0.70, 0.80]
    assert row["time_per_epoch_s"] == 2.0 and len(row["runs"]) == 3


def test_table_rates_come_from_the_counters():
    """items / s = occurrences / training seconds; encoder tokens / s = real tokens forward and
    backward / training seconds; padded / real = padded / real forward tokens. A run from before
    the token counters shows none."""
    run = _fake_run(10, 4.0, 0.7)
    run["metrics"]["counters"] |= {
        "tokens_forward": 600,
        "padded_forward": 900,
        "tokens_backward": 200,
        "padded_backward": 300,
    }
    row = summarise([run], 10, extrapolated=False)
    assert row["items_per_s"] == 300 / 4.0 and row["encoder_tokens_per_s"] == 800 / 4.0
    assert row["padded_per_real_token"] == 1.5
    old = summarise([_fake_run(10, 4.0, 0.7)], 10, extrapolated=False)
    assert old["encoder_tokens_per_s"] is None and old["padded_per_real_token"] is None


def test_extrapolated_e2e_has_no_accuracy():
    spe = 10
    e2e = summarise([_fake_run(3, 1.5, 0.9)], spe, extrapolated=True)
    assert e2e["time_per_epoch_s"] == 5.0  # 1.5 s / 3 steps x 10 steps per epoch
    assert e2e["item_backwards_per_epoch"] == 300 and e2e["valid"] is None and not e2e["curve"]
    assert "extrapolated" in e2e["note"]
    rows = {"e2e": e2e}
    for name in LABELS[1:]:
        rows[name] = summarise([_fake_run(20, 2.0, 0.7)], spe, extrapolated=False)
    for row in rows.values():
        row["speedup"] = e2e["time_per_epoch_s"] / row["time_per_epoch_s"]
    result = {
        "workload": "fake",
        "order": list(rows),
        "description": "d",
        "epochs": 2,
        "steps_per_epoch": spe,
        "repeats": 1,
        "total_seconds": 1.0,
        "strategies": rows,
        "bound": None,
        "stats": {"occurrences": 300, "distinct_items": 20},
        "predicted": {"R_batch": 3.0, "R_epoch": 15.0},
        "machine": {
            "cpu": "c",
            "cores": 2,
            "gpu": None,
            "torch_threads": 2,
            "load_average_at_start": 0.0,
            "versions": {"python": "3"},
            "date": "today",
        },
    }
    result["targets"] = targets(result)
    auc = [t for t in result["targets"] if "AUC" in t["name"]]
    assert len(auc) == 1 and auc[0]["met"] is None and "extrapolated" in auc[0]["text"]
    md = markdown(result)
    assert "| e2e (extrapolated) | 5.00 (extrapolated) | 1.00x | 60 | - | - |" in md
    assert "n/a" in md.split("| e2e (extrapolated)")[1].splitlines()[0]


def _fake_result(rows: dict, gpu: str | None = None, spe: int = 10) -> dict:
    """A benchmark result around ``rows`` (name -> summarised row, e2e first), as cli.bench
    writes it, with its targets."""
    for row in rows.values():
        row["speedup"] = rows["e2e"]["time_per_epoch_s"] / row["time_per_epoch_s"]
    machine = {
        "cpu": "c",
        "cores": 2,
        "gpu": gpu,
        "torch_threads": 2,
        "date": "today",
        "load_average_at_start": 0.0,
        "versions": {"python": "3"},
    }
    stats = {"occurrences": 300, "distinct_items": 20}
    result = {
        "workload": "fake",
        "order": list(rows),
        "description": "d",
        "epochs": 1,
        "steps_per_epoch": spe,
        "repeats": 1,
        "total_seconds": 1.0,
        "strategies": rows,
        "bound": None,
        "stats": stats,
        "machine": machine,
        "predicted": {"R_batch": 3.0, "R_epoch": 15.0},
    }
    result["targets"] = targets(result)
    return result


def _timed_run(encoder_seconds: float, padded: int, auc: float) -> dict:
    """A fake run of 10 steps whose encoder took ``encoder_seconds`` over 600 real tokens
    forward (``padded`` padded ones) and 600 backward."""
    run = _fake_run(10, 4.0, auc)
    run["metrics"]["counters"] |= {
        "tokens_forward": 600,
        "padded_forward": padded,
        "tokens_backward": 600,
        "padded_backward": padded,
        "attention_pairs_forward": 0,
        "attention_pairs_backward": 0,
    }
    run["metrics"]["encoder_seconds"] = encoder_seconds
    run["metrics"]["encoder_flops_shape"] = {"params": 1000, "layers": 2, "hidden": 8}
    return run


def test_kt_varied_runs_each_strategy_sorted_and_unsorted(tmp_path):
    """kt-varied trains e2e, single and multi 1E twice: calls sorted by length and in the
    items' own order (--chunk-order given, rows "... unsorted"); --e2e-steps caps both e2e."""
    from gram_scale.bench.children import run_options, to_argv

    workload = WORKLOADS["kt-varied"]
    labels = [run.label for run in workload.runs]
    assert labels == [
        "e2e",
        "e2e unsorted",
        "single",
        "single unsorted",
        "multi 1E",
        "multi 1E unsorted",
    ]
    assert set(workload.capped) == {"e2e", "e2e unsorted"}
    base = Options(**workload.options)
    for run in workload.runs:
        argv = to_argv(run_options(base, run, tmp_path / "run", 0))
        assert ("--chunk-order" in argv) == run.label.endswith(UNSORTED), run
        if run.label.endswith(UNSORTED):
            assert argv[argv.index("--chunk-order") + 1] == "given"


def test_report_sets_sorted_and_unsorted_runs_side_by_side():
    """Each strategy's encoder seconds per epoch and padded / real tokens, unsorted over sorted,
    and both runs' AUCs, in one line of the report, with a target on each."""
    rows = {
        "e2e": summarise([_timed_run(2.0, 720, 0.75)], 10, extrapolated=False),
        "e2e unsorted": summarise([_timed_run(3.0, 900, 0.7504)], 10, extrapolated=False),
        "single": summarise([_timed_run(1.0, 720, 0.75)], 10, extrapolated=False),
        "single unsorted": summarise([_timed_run(1.2, 900, 0.70)], 10, extrapolated=False),
        "multi 1E": summarise([_timed_run(0.5, 720, 0.74)], 10, extrapolated=False),
    }
    assert rows["e2e"]["encoder_seconds_per_epoch"] == 2.0
    result = _fake_result(rows)
    md = markdown(result)
    assert "| encoder s / epoch |" in md and "MFU" not in md  # no GPU: no MFU column
    assert (
        "- e2e: encoder 3.00 s / epoch unsorted, 2.00 sorted: 1.50x; padded / real tokens "
        "1.50 unsorted, 1.20 sorted: 1.25x; valid AUC 0.7500 sorted, 0.7504 unsorted; test "
        "AUC 0.7500 sorted, 0.7504 unsorted."
    ) in md
    assert "- single: encoder 1.20 s / epoch unsorted, 1.00 sorted: 1.20x;" in md
    assert "- multi 1E:" not in md  # no unsorted twin
    verdicts = {t["name"]: t["met"] for t in result["targets"]}
    assert verdicts["e2e: sorting saves >= 1.3x of the encoder time"] is True
    assert verdicts["single: sorting saves >= 1.3x of the encoder time"] is False
    assert verdicts["e2e: sorted and unsorted AUCs equal (valid and test)"] is True
    assert verdicts["single: sorted and unsorted AUCs equal (valid and test)"] is False
    assert not any(name.startswith("multi 1E:") for name in verdicts)


def test_encoder_flops_and_mfu_from_made_up_counts():
    """Model FLOPs on padded tokens: forward 2 N per token + 4 x layers x hidden per attention
    pair, backward twice that; MFU = FLOP/s per process over the card's bf16 dense peak."""
    from gram_scale.bench.report import _encoder_rate, mfu, peak_tflops

    counters = {
        "padded_forward": 1000,
        "padded_backward": 500,
        "attention_pairs_forward": 20_000,
        "attention_pairs_backward": 10_000,
    }
    shape = {"params": 1_000_000, "layers": 2, "hidden": 64}
    # 2e6 x 1000 + 4e6 x 500 + 4 x 2 x 64 x 20,000 + 8 x 2 x 64 x 10,000
    assert encoder_flops(counters, shape) == 4_020_480_000.0
    assert encoder_flops(counters, dict(shape, layers=None)) == 4_000_000_000.0  # no attention
    assert encoder_flops({"occurrences": 1}, shape) is None  # a run from before the counters
    metrics = {
        "counters": counters,
        "encoder_flops_shape": shape,
        "encoder_seconds": 0.004,
        "processes": 2,
    }
    # 4.02048e9 FLOPs over 2 processes x 4 ms = 0.50256 TFLOP/s per process
    assert _encoder_rate(metrics) == pytest.approx(0.50256)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Tesla V100-SXM2-16GB") is None and peak_tflops(None) is None
    assert mfu(494.5, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert mfu(494.5, None) is None and mfu(None, "NVIDIA H200") is None


def test_mfu_column_only_on_a_gpu():
    """On a CUDA machine the table has the encoder's MFU against the card's peak (n/a for a card
    not in the table); on a CPU no such column."""
    rate = 0.08 * 989.0 * 1e12  # FLOP/s that make 8% of an H100
    run = _timed_run(1.0, 720, 0.75)
    shape = run["metrics"]["encoder_flops_shape"]
    run["metrics"]["encoder_seconds"] = encoder_flops(run["metrics"]["counters"], shape) / rate
    rows = {
        "e2e": summarise([run], 10, extrapolated=False),
        "multi 1E": summarise([_timed_run(0.5, 720, 0.75)], 10, extrapolated=False),
    }
    for row in rows.values():
        row["cuda_peak_bytes"] = 1 << 20  # a GPU run records its peak
    for gpu, cell in (("NVIDIA H100 80GB HBM3", "8.0%"), ("NVIDIA L4", "n/a (peak unknown)")):
        md = markdown(_fake_result(rows, gpu=gpu))
        header, row = [line for line in md.splitlines() if line.startswith("| ")][:2]
        column = header.split(" | ").index("encoder MFU (bf16 peak)")
        assert row.split(" | ")[column] == cell, gpu
    assert "MFU" not in markdown(_fake_result(rows, gpu=None))


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--workload", "nope"], "--workload"),
        (["--workload", "tiny", "--repeats", "0"], "--repeats"),
        (["--workload", "tiny", "--e2e-steps", "-1"], "--e2e-steps"),
        (["--workload", "tiny", "--epochs", "x"], "--epochs"),
        (["--workload", "tiny", "--seeds", "0,x"], "--seeds"),
        (["--workload", "tiny", "--seeds", "1,1"], "--seeds"),
        (["--workload", "tiny", "--reuse", "e2e,nope"], "--reuse"),
        (["--workload", "tiny", "--jobs", "0"], "--jobs"),
        (["--workload", "tiny", "--data-seed", "-1"], "--data-seed"),
        (["--workload", "tiny", "--multi-options=--nope 1"], "--multi-options"),
        (["--workload", "tiny", "--multi-options=--seed 3"], "--multi-options"),
        (["--workload", "tiny", "--multi-options=--window 'x"], "--multi-options"),
        (["--workload", "tiny", "--multi-options=--cf-refresh -2"], "--cf-refresh"),
    ],
)
def test_bad_flags_exit_2(args, flag):
    r = _bench(*args, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert flag in r.stderr


def test_multi_options_change_only_the_multi_step_runs():
    """--multi-options: the fields its flags change, applied to the Multi-step runs alone."""
    from gram_scale.bench.children import run_options, to_argv
    from gram_scale.bench.cli import multi_overrides
    from gram_scale.bench.report import _multi_options
    from gram_scale.bench.workloads import E2E, MULTI_1E

    changed = multi_overrides("--cf-refresh 10 --target-distance 2 --no-keyed-dropout")
    assert changed == {"cf_refresh": "10", "target_distance": 2.0, "keyed_dropout": False}
    assert multi_overrides("") == {} == multi_overrides("--cf-refresh auto")  # the defaults
    argv = {
        run.label: to_argv(run_options(Options(), run, Path("o"), 0, 0, changed))
        for run in (E2E, MULTI_1E)
    }
    assert "--cf-refresh" in argv["multi 1E"] and "--no-keyed-dropout" in argv["multi 1E"]
    assert "--cf-refresh" not in argv["e2e"] and "--no-keyed-dropout" not in argv["e2e"]
    assert "cf_refresh = 10" in "\n".join(_multi_options({"multi_options": changed}))
    assert _multi_options({"multi_options": {}}) == [] == _multi_options({})


def test_bench_modules_import_no_cycle():
    """The package's modules import each other (at the top or in functions) without a cycle."""
    import ast

    folder = ROOT / "gram_scale" / "bench"
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "gram_scale.bench":
                    deps |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith("gram_scale.bench."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = deps - {path.stem}
    assert graph["cli"] >= {"workloads", "children", "costs", "report"}  # the walk sees imports
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_reuse_takes_only_a_run_of_the_same_flags(tmp_path):
    from gram_scale.bench.children import RECORD, reuse_child, to_argv

    opts = Options(output_dir=str(tmp_path), epochs=3)
    assert reuse_child(opts) is None  # nothing trained there yet
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 7}))
    record = {
        "rss": 1,
        "wall": 2.0,
        "other_cores": 0.0,
        "dir": str(tmp_path),
        "argv": to_argv(opts),
        "date": "then",
    }
    (tmp_path / RECORD).write_text(json.dumps(record))
    got = reuse_child(opts)
    assert got["reused"] is True and got["metrics"] == {"steps": 7} and got["wall"] == 2.0
    assert reuse_child(Options(output_dir=str(tmp_path), epochs=4)) is None  # other flags


def test_every_workload_validates_and_exports_only_under_save_best(tiny_encoder, tmp_path):
    """Each workload's shared options pass the trainer's checks (a --save-best workload must
    export its runs: --save-best with --no-export is refused) and its runs' flags carry them."""
    from gram_scale.bench.children import run_options, to_argv
    from gram_scale.bench.cli import shared_options
    from gram_scale.config import validate

    assert any(w.options.get("save_best") for w in WORKLOADS.values())
    for name, workload in WORKLOADS.items():
        options = shared_options(workload, "none", str(tmp_path))
        base = validate(Options(**options, data=str(tmp_path), encoder=str(tiny_encoder)))
        assert base.export == bool(workload.options.get("save_best")), name
        for run in workload.runs:
            argv = to_argv(validate(run_options(base, run, tmp_path / "run", 1)))
            assert ("--save-best" in argv) == base.save_best, (name, run)
            assert ("--no-export" in argv) != base.save_best, (name, run)
