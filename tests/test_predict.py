"""Using a finished run: predict reproduces the run's metrics on its own splits, writes the MIND
leaderboard file and per-interaction probabilities, top-K equals a brute-force ranking, the
Python API agrees with the command, and wrong input ends in one line with exit 2."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tiny import fake_valid_auc, options

from gram_scale.errors import InputError
from gram_scale.predict import main, predict, ranks, top_k
from gram_scale.trainer import train

ROOT = Path(__file__).resolve().parents[1]
BEST_AUC = 0.99  # the faked valid AUC that makes step 2 of the KT run its best


@pytest.fixture(scope="module")
def kt_run(kt_dir, tiny_encoder, tmp_path_factory) -> Path:
    """A KT run of 4 steps with --save-best, evaluated after steps 2 and 4, whose valid AUC after
    step 2 is faked to be the best: its export is step 2's model, not the last one."""
    out = tmp_path_factory.mktemp("kt-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        fake_valid_auc(mp, {2: BEST_AUC})
        train(
            options(
                data=str(kt_dir),
                encoder=str(tiny_encoder),
                export=True,
                max_steps=4,
                eval_every=2,
                save_best=True,
                output_dir=str(out),
            )
        )
    return out


@pytest.fixture(scope="module")
def news_run(news_dir, tiny_encoder, tmp_path_factory) -> Path:
    """A news run of 4 steps with its exports."""
    out = tmp_path_factory.mktemp("news-run") / "run"
    train(
        options(
            task="news",
            data=str(news_dir),
            encoder=str(tiny_encoder),
            export=True,
            max_steps=4,
            output_dir=str(out),
        )
    )
    return out


def run_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_close(got: dict, want: dict, keys) -> None:
    for k in keys:
        assert abs(got[k] - want[k]) <= 1e-6, (k, got[k], want[k])


def unlabeled_copy(split: Path, folder: Path) -> Path:
    """A MIND split folder in the test layout: the same impressions, candidates without labels."""
    folder.mkdir(parents=True)
    shutil.copy(split / "news.tsv", folder / "news.tsv")
    lines = []
    for line in (split / "behaviors.tsv").read_text().splitlines():
        fields = line.split("\t")
        fields[4] = " ".join(t.rpartition("-")[0] for t in fields[4].split())
        lines.append("\t".join(fields))
    (folder / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    return folder


def read_prediction(path: Path) -> list[tuple[str, list[int]]]:
    out = []
    for line in path.read_text().splitlines():
        impression, text = line.split(" ", 1)
        assert text.startswith("[") and text.endswith("]") and " " not in text, line
        out.append((impression, [int(r) for r in text[1:-1].split(",")]))
    return out


# ---- the run's own splits give back its metrics --------------------------------------------
@pytest.mark.parametrize("split", ["valid", "test"])
def test_news_split_reproduces_run_metrics(split, news_run, tmp_path):
    got = predict(news_run, tmp_path / "out", split=split, device="cpu")
    want = run_metrics(news_run)[split]
    assert_close(got, want, ("auc", "mrr", "ndcg@5", "ndcg@10", "cold_auc"))
    assert got["impressions"] == want["impressions"] > 0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["metrics"] == got and written["split"] == split
    assert len(read_prediction(tmp_path / "out" / "prediction.txt")) > want["impressions"] / 2


def test_kt_split_reproduces_the_best_models_metrics(kt_run, tmp_path):
    """--save-best exported step 2's models: predict's test metrics are that model's (what
    metrics.json reports), not the last model's."""
    m = run_metrics(kt_run)
    assert m["best_step"] == 2 and m["steps"] == 4
    got = predict(kt_run, tmp_path / "test", split="test", device="cpu")
    assert_close(got, m["test"], ("auc", "acc", "cold_auc"))
    assert got["interactions"] == m["test"]["interactions"]
    assert abs(got["auc"] - m["last_test"]["auc"]) > 1e-4  # the last model scores otherwise
    valid = predict(kt_run, tmp_path / "valid", split="valid", device="cpu")
    assert_close(valid, m["valid"], ("acc", "cold_auc"))  # its AUC was faked to pick the best
    assert m["valid"]["auc"] == BEST_AUC


def test_kt_predictions_csv_follows_the_input_file(kt_run, kt_dir, tmp_path):
    """Without --split the whole interactions file is scored: one row per input line, in the
    file's order; the metrics are those of every interaction (no cold-start AUC without the
    run's training data)."""
    got = predict(kt_run, tmp_path / "out", data=str(kt_dir), device="cpu")
    with open(kt_dir / "interactions.csv") as f:
        source = list(csv.DictReader(f))
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(source) == got["interactions"]
    assert [int(r["line"]) for r in rows] == list(range(2, len(source) + 2))
    for r, s in zip(rows, source):
        assert (r["user_id"], r["item_id"], r["correct"]) == (
            s["user_id"],
            s["item_id"],
            s["correct"],
        )
        assert 0 < float(r["probability"]) < 1
    assert "cold_auc" not in got and 0 <= got["auc"] <= 1


def read_probabilities(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["line"]): float(r["probability"]) for r in csv.DictReader(f)}


def test_kt_unknown_answers(kt_run, kt_dir, tmp_path):
    """An empty ``correct`` is an answer not known yet: the interaction is scored as the next
    question after the user's known answers before it (here the 25th of a user's, in the second
    window of 20: the same probability as with its answer, which it never reads), the later
    ones as if it were not in the file, and the metrics count only known answers."""
    from gram_scale.data.kt import read_interactions, read_items

    log = read_interactions(kt_dir / "interactions.csv", read_items(kt_dir / "items.csv"))
    user = next(u for u, at in enumerate(log.lines) if len(at) >= 30)
    blank, after = int(log.lines[user][24]), log.lines[user][25:].tolist()
    rows = (kt_dir / "interactions.csv").read_text().splitlines()
    header = rows[0].split(",")
    at = header.index("correct")
    fields = rows[blank - 1].split(",")
    fields[at] = ""
    blanked = rows[: blank - 1] + [",".join(fields)] + rows[blank:]
    dropped = rows[: blank - 1] + rows[blank:]
    for name, text in (("blanked", blanked), ("dropped", dropped)):
        (tmp_path / name).mkdir()
        shutil.copy(kt_dir / "items.csv", tmp_path / name / "items.csv")
        (tmp_path / name / "interactions.csv").write_text("\n".join(text) + "\n")

    full = predict(kt_run, tmp_path / "p-full", data=str(kt_dir), device="cpu")
    got = predict(kt_run, tmp_path / "p-blanked", data=str(tmp_path / "blanked"), device="cpu")
    without = predict(kt_run, tmp_path / "p-dropped", data=str(tmp_path / "dropped"), device="cpu")
    assert got == without and got["interactions"] == full["interactions"] - 1
    p_full = read_probabilities(tmp_path / "p-full" / "predictions.csv")
    p_blank = read_probabilities(tmp_path / "p-blanked" / "predictions.csv")
    p_drop = read_probabilities(tmp_path / "p-dropped" / "predictions.csv")
    assert len(p_blank) == len(p_full)
    assert p_blank[blank] == pytest.approx(p_full[blank], abs=1e-6)
    for line in after:  # read without the unknown answer, as if the row were not there
        assert p_blank[line] == pytest.approx(p_drop[line - 1], abs=1e-6)
    # and that differs from reading its answer
    assert any(p_blank[line] != pytest.approx(p_full[line], abs=1e-4) for line in after)
    with open(tmp_path / "p-blanked" / "predictions.csv") as f:
        assert next(r for r in csv.DictReader(f) if int(r["line"]) == blank)["correct"] == ""

    # no correct column at all: every interaction is a first question, no metrics
    (tmp_path / "none").mkdir()
    shutil.copy(kt_dir / "items.csv", tmp_path / "none" / "items.csv")
    keep = [i for i, h in enumerate(header) if h != "correct"]
    text = [",".join(r.split(",")[i] for i in keep) for r in rows]
    (tmp_path / "none" / "interactions.csv").write_text("\n".join(text) + "\n")
    assert predict(kt_run, tmp_path / "p-none", data=str(tmp_path / "none"), device="cpu") is None
    assert not (tmp_path / "p-none" / "metrics.json").exists()
    with open(tmp_path / "p-none" / "predictions.csv") as f:
        by_item = {}
        for r in csv.DictReader(f):
            assert r["correct"] == ""
            by_item.setdefault(r["item_id"], set()).add(r["probability"])
    assert all(len(p) == 1 for p in by_item.values())  # no history: the item alone decides


# ---- the MIND leaderboard file ----------------------------------------------------------------
def test_prediction_txt_ranks_follow_scores(news_run, news_dir, tmp_path):
    """The test layout (no labels): prediction.txt and prediction.zip, no metrics; each
    impression's ranks are a permutation of 1..n that orders its candidates by score; the
    labelled folder gives the same file and its metrics."""
    from gram_scale.data.mind import read_split
    from gram_scale.inference import empty_data, load_run

    bare = unlabeled_copy(news_dir / "dev", tmp_path / "test-layout")
    assert predict(news_run, tmp_path / "bare", data=str(bare), device="cpu") is None
    assert not (tmp_path / "bare" / "metrics.json").exists()
    text = (tmp_path / "bare" / "prediction.txt").read_text()
    with zipfile.ZipFile(tmp_path / "bare" / "prediction.zip") as z:
        assert z.namelist() == ["prediction.txt"] and z.read("prediction.txt").decode() == text
    lines = read_prediction(tmp_path / "bare" / "prediction.txt")

    run = load_run(news_run, "cpu")
    part = read_split(news_dir / "dev")
    assert [i for i, _ in lines] == [k for k, _ in part.keys]
    vectors = run.encode_items(part.catalogue.texts)
    task = run.task_for(empty_data("news", part.catalogue, part.impressions))
    for (_, got), imp in zip(lines, part.impressions):
        assert sorted(got) == list(range(1, len(imp.candidates) + 1))
        s = run.score(history=vectors[imp.history], candidates=vectors[imp.candidates])
        order = sorted(range(len(got)), key=got.__getitem__)  # candidates, best first
        assert all(s[a] >= s[b] - 1e-6 for a, b in zip(order, order[1:]))
    # the command's own scores, through the task, give exactly its ranks
    scores = task.predict(part.impressions, run.catalogue_vectors(part.catalogue.texts).lookup)
    assert [r for _, r in lines] == [ranks(s) for s in scores]

    labelled = predict(news_run, tmp_path / "labelled", data=str(news_dir / "dev"), device="cpu")
    assert (tmp_path / "labelled" / "prediction.txt").read_text() == text
    assert labelled["impressions"] > 0 and "cold_auc" not in labelled


def test_ranks_break_ties_by_position():
    assert ranks(torch.tensor([0.1, 0.5, 0.5, -1.0])) == [3, 1, 2, 4]


# ---- top K --------------------------------------------------------------------------------
def brute_force(users, vectors, exclude, k):
    s = users @ vectors.T
    for u, rows in enumerate(exclude.tolist()):
        for r in rows:
            if r >= 0:
                s[u, r] = -float("inf")
    order = torch.argsort(s, dim=1, descending=True)[:, :k]
    return s.gather(1, order), order


@pytest.mark.parametrize("k, chunk", [(4, 5), (4, 100), (1, 3), (30, 7)])
def test_top_k_equals_brute_force(k, chunk):
    g = torch.Generator().manual_seed(0)
    users, vectors = torch.randn(6, 8, generator=g), torch.randn(23, 8, generator=g)
    exclude = torch.randint(0, 23, (6, 5), generator=g)
    exclude[0] = -1  # a user with no history
    exclude[1, 2:] = -1
    s, rows = top_k(users, vectors, exclude, k, chunk)
    want_s, want_rows = brute_force(users, vectors, exclude, k)
    assert rows.shape == (6, min(k, 23))
    finite = torch.isfinite(want_s)
    assert torch.equal(torch.isfinite(s), finite)
    assert torch.equal(rows[finite], want_rows[finite])
    assert torch.allclose(s[finite], want_s[finite])
    for u, hist in enumerate(exclude.tolist()):  # clicked news never come back
        assert not set(hist) & set(rows[u][finite[u]].tolist())


def test_topk_file_ranks_the_catalogue(news_run, news_dir, tmp_path):
    """--topk: each user's K best news of the split's catalogue, from the user's last
    impression's history, history left out, equal to a brute-force ranking."""
    from gram_scale.data.mind import read_split
    from gram_scale.inference import empty_data, load_run

    predict(news_run, tmp_path / "out", data=str(news_dir / "dev"), topk=5, chunk=7, device="cpu")
    lines = (tmp_path / "out" / "topk.tsv").read_text().splitlines()
    run = load_run(news_run, "cpu")
    part = read_split(news_dir / "dev")
    task = run.task_for(empty_data("news", part.catalogue, part.impressions))
    vectors = run.encode_items(part.catalogue.texts)
    last = {user: i for i, (_, user) in enumerate(part.keys)}
    assert [line.split("\t")[0] for line in lines] == list(last)
    hist = task.histories([part.impressions[i] for i in last.values()])
    users = task.user_vectors(hist, torch.arange(len(vectors)), vectors)
    want_s, want_rows = brute_force(users, vectors, hist, 5)
    for line, rows, s in zip(lines, want_rows, want_s):
        _, ids, scores = line.split("\t")
        assert ids.split() == [part.catalogue.ids[r] for r in rows.tolist()]
        assert [float(v) for v in scores.split()] == pytest.approx(s.tolist(), rel=1e-5)


# ---- several processes ------------------------------------------------------------------------
def launch_predict(*argv) -> None:
    """``gram_scale.predict ARGV`` on 2 CPU processes (accelerate launch, gloo)."""
    from launching import run

    run(
        [*map(str, argv), "--device", "cpu"],
        processes=2,
        launcher_args=["-m"],
        script="gram_scale.predict",
    )


def test_two_processes_predict_as_one(kt_run, news_run, kt_dir, news_dir, tmp_path):
    """Launched on 2 processes, each rank encodes only the catalogue items it owns (together
    each item once) and scores its share; the files equal one process's: the KT split's
    probabilities and metrics, the news metrics, leaderboard ranks and top-K."""
    from gram_scale.data.kt import read_items
    from gram_scale.data.mind import read_split
    from gram_scale.exchange import owner_of
    from gram_scale.inference import empty_data, load_run

    launch_predict("--run", kt_run, "--split", "test", "--out", tmp_path / "kt2")
    launch_predict(
        "--run", news_run, "--data", news_dir / "dev", "--topk", 3, "--out", tmp_path / "news2"
    )
    one = predict(kt_run, tmp_path / "kt1", split="test", device="cpu")
    two = json.loads((tmp_path / "kt2" / "metrics.json").read_text())
    assert_close(two["metrics"], one, ("auc", "acc", "cold_auc"))
    n_items = len(read_items(kt_dir / "items.csv"))
    assert two["processes"] == 2
    assert (
        two["encoded_items_per_process"]
        == torch.bincount(owner_of(torch.arange(n_items), 2), minlength=2).tolist()
    )
    assert min(two["encoded_items_per_process"]) > 0
    p_one = read_probabilities(tmp_path / "kt1" / "predictions.csv")
    p_two = read_probabilities(tmp_path / "kt2" / "predictions.csv")
    assert p_two.keys() == p_one.keys() and len(p_one) == one["interactions"]
    assert max(abs(p_two[k] - p_one[k]) for k in p_one) <= 1e-6

    one = predict(news_run, tmp_path / "news1", data=str(news_dir / "dev"), topk=3, device="cpu")
    two = json.loads((tmp_path / "news2" / "metrics.json").read_text())
    assert_close(two["metrics"], one, ("auc", "mrr", "ndcg@5", "ndcg@10"))
    assert sum(two["encoded_items_per_process"]) == len(read_split(news_dir / "dev").catalogue)
    # ranks agree wherever one process's scores leave no near tie (float order may differ)
    run = load_run(news_run, "cpu")
    part = read_split(news_dir / "dev")
    task = run.task_for(empty_data("news", part.catalogue, part.impressions))
    scores = task.predict(part.impressions, run.catalogue_vectors(part.catalogue.texts).lookup)
    lines_one = read_prediction(tmp_path / "news1" / "prediction.txt")
    lines_two = read_prediction(tmp_path / "news2" / "prediction.txt")
    assert [i for i, _ in lines_two] == [i for i, _ in lines_one]
    clear = [
        float(torch.sort(s).values.diff().min()) > 1e-5 if len(s) > 1 else True for s in scores
    ]
    assert sum(clear) >= len(clear) / 2
    assert all(a == b for (_, a), (_, b), c in zip(lines_one, lines_two, clear) if c)
    top_one = (tmp_path / "news1" / "topk.tsv").read_text().splitlines()
    top_two = (tmp_path / "news2" / "topk.tsv").read_text().splitlines()
    assert [t.split("\t")[:2] for t in top_two] == [t.split("\t")[:2] for t in top_one]


# ---- the Python API ---------------------------------------------------------------------------
def test_load_run_scores_like_predict(kt_run, kt_dir, tmp_path):
    """``gram_scale.load_run``: encode_items and score(items, correct) give the probabilities
    predictions.csv holds; the wrong arguments for the task are refused."""
    import gram_scale
    from gram_scale.data.kt import read_interactions, read_items

    predict(kt_run, tmp_path / "out", data=str(kt_dir), device="cpu")
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    run = gram_scale.load_run(kt_run, device="cpu")
    assert run.task == "kt" and run.metrics["best_step"] == 2
    catalogue = read_items(kt_dir / "items.csv")
    log = read_interactions(kt_dir / "interactions.csv", catalogue)
    vectors = run.encode_items(catalogue.texts)
    (items, correct), lines = log.sequences[0], log.lines[0]
    items, correct, lines = items[:20], correct[:20], lines[:20]  # one --seq-len window
    p = run.score(items=vectors[items], correct=correct)
    by_line = {int(r["line"]): float(r["probability"]) for r in rows}
    assert [by_line[n] for n in lines.tolist()] == pytest.approx(p.tolist(), abs=1e-6)
    with pytest.raises(InputError, match="this is a kt run: score"):
        run.score(history=vectors[:3], candidates=vectors[3:5])


# ---- wrong input: one line, exit 2 -------------------------------------------------------------
def one_line_exit_2(capsys, *argv) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_not_a_run(capsys, tmp_path, kt_dir):
    (tmp_path / "empty").mkdir()
    line = one_line_exit_2(
        capsys, "--run", tmp_path / "empty", "--data", kt_dir, "--out", tmp_path / "out"
    )
    assert "not a finished gram-scale run (no options.json" in line
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    line = one_line_exit_2(
        capsys, "--run", tmp_path / "file", "--split", "test", "--out", tmp_path / "out"
    )
    assert "is a file, not a run's output folder" in line


def test_run_without_exports(capsys, tmp_path, kt_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "options.json").write_text("{}")
    line = one_line_exit_2(
        capsys, "--run", tmp_path / "run", "--data", kt_dir, "--out", tmp_path / "out"
    )
    assert "the run exported no models" in line and "--no-export" in line


def test_run_of_the_other_task(capsys, kt_run, news_run, kt_dir, news_dir, tmp_path):
    line = one_line_exit_2(
        capsys, "--run", kt_run, "--data", news_dir / "dev", "--out", tmp_path / "a"
    )
    assert f"is MIND news data, but {kt_run} is a kt run" in line
    line = one_line_exit_2(capsys, "--run", news_run, "--data", kt_dir, "--out", tmp_path / "b")
    assert f"is knowledge-tracing data, but {news_run} is a news run" in line
    line = one_line_exit_2(
        capsys, "--run", kt_run, "--data", kt_dir, "--topk", "3", "--out", tmp_path / "c"
    )
    assert f"--topk: ranks news; {kt_run} is a kt run" in line


def test_unknown_item_ids(capsys, kt_run, news_run, kt_dir, news_dir, tmp_path):
    kt = tmp_path / "kt"
    kt.mkdir()
    shutil.copy(kt_dir / "items.csv", kt / "items.csv")
    rows = (kt_dir / "interactions.csv").read_text().splitlines()
    rows[3] = rows[3].split(",")[0] + ",no_such_item,1," + rows[3].split(",")[3]
    (kt / "interactions.csv").write_text("\n".join(rows) + "\n")
    line = one_line_exit_2(capsys, "--run", kt_run, "--data", kt, "--out", tmp_path / "a")
    assert f"{kt / 'interactions.csv'}:4: unknown item id 'no_such_item'" in line

    news = unlabeled_copy(news_dir / "dev", tmp_path / "news")
    rows = (news / "behaviors.tsv").read_text().splitlines()
    fields = rows[1].split("\t")
    fields[4] = fields[4] + " N_unknown"
    rows[1] = "\t".join(fields)
    (news / "behaviors.tsv").write_text("\n".join(rows) + "\n")
    line = one_line_exit_2(capsys, "--run", news_run, "--data", news, "--out", tmp_path / "b")
    assert f"{news / 'behaviors.tsv'}:2: unknown news id 'N_unknown' in impressions" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_labels_on_some_impressions_only(capsys, news_run, news_dir, tmp_path):
    news = unlabeled_copy(news_dir / "dev", tmp_path / "news")
    rows = (news / "behaviors.tsv").read_text().splitlines()
    rows[2] = (news_dir / "dev" / "behaviors.tsv").read_text().splitlines()[2]
    (news / "behaviors.tsv").write_text("\n".join(rows) + "\n")
    line = one_line_exit_2(capsys, "--run", news_run, "--data", news, "--out", tmp_path / "out")
    assert ":3: impression" in line and "has a click label but those on line 1 have none" in line


def test_empty_files(capsys, kt_run, news_run, kt_dir, news_dir, tmp_path):
    kt = tmp_path / "kt"
    kt.mkdir()
    shutil.copy(kt_dir / "items.csv", kt / "items.csv")
    (kt / "interactions.csv").write_text("")
    line = one_line_exit_2(capsys, "--run", kt_run, "--data", kt, "--out", tmp_path / "a")
    assert f"{kt / 'interactions.csv'}:1: empty file (no header)" in line
    news = tmp_path / "news"
    news.mkdir()
    shutil.copy(news_dir / "dev" / "news.tsv", news / "news.tsv")
    (news / "behaviors.tsv").write_text("")
    line = one_line_exit_2(capsys, "--run", news_run, "--data", news, "--out", tmp_path / "b")
    assert f"{news / 'behaviors.tsv'}:1: empty file (no behavior rows)" in line


def test_flag_mistakes(capsys, news_run, news_dir, tmp_path):
    line = one_line_exit_2(capsys, "--run", news_run, "--out", tmp_path / "a")
    assert "--data: missing" in line
    line = one_line_exit_2(capsys, "--run", news_run, "--data", news_dir, "--out", tmp_path / "b")
    assert "is a MIND training data folder (train/, dev/): add --split" in line
    line = one_line_exit_2(
        capsys,
        "--run",
        news_run,
        "--data",
        news_dir / "dev",
        "--split",
        "test",
        "--out",
        tmp_path / "c",
    )
    assert "--split: picks a split of the run's training data folder" in line
    line = one_line_exit_2(capsys, "--run", news_run, "--split", "train", "--out", tmp_path / "d")
    assert "--split: invalid choice: 'train'" in line
    (tmp_path / "file").write_text("")
    line = one_line_exit_2(capsys, "--run", news_run, "--split", "test", "--out", tmp_path / "file")
    assert "--out: " in line and "is a file" in line


def test_command_line_exit_code(tmp_path):
    """The module runs as a command: one line on stderr, exit 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gram_scale.predict",
            "--run",
            str(tmp_path),
            "--split",
            "test",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a finished gram-scale run (no options.json; a run writes it "
        "with its exports when it ends)"
    ]


# ---- embed -----------------------------------------------------------------------------------
def read_vectors(path: Path) -> tuple[list[str], torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ids"]), f.get_tensor("vectors")


def test_embed_training_items_equals_exported_vectors(kt_run, news_run, kt_dir, news_dir, tmp_path):
    """The export's item-vector format, and the vectors the run exported (the best model's for
    the --save-best KT run), from an items.csv and from a news.tsv."""
    from gram_scale.embed import main as embed_main

    out = tmp_path / "new" / "kt.safetensors"
    assert (
        embed_main(
            [
                "--run",
                str(kt_run),
                "--items",
                str(kt_dir / "items.csv"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ids, vectors = read_vectors(out)
    want_ids, want = read_vectors(kt_run / "item_vectors.safetensors")
    assert ids == want_ids and vectors.dtype == want.dtype
    assert float((vectors - want).abs().max()) < 1e-5
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    out = tmp_path / "news.safetensors"
    assert (
        embed_main(
            [
                "--run",
                str(news_run),
                "--items",
                str(news_dir / "train" / "news.tsv"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ids, vectors = read_vectors(out)
    all_ids, exported = read_vectors(news_run / "item_vectors.safetensors")
    at = {item: i for i, item in enumerate(all_ids)}
    assert len(ids) < len(all_ids)  # dev-only news are in the export, not in train/news.tsv
    assert float((vectors - exported[[at[i] for i in ids]]).abs().max()) < 1e-5


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_embed_mistakes(capsys, kt_run, kt_dir, tmp_path):
    from gram_scale.embed import main as embed_main

    def one_line(*argv) -> str:
        assert embed_main(list(map(str, argv))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    (tmp_path / "empty.csv").write_text("")
    line = one_line("--run", kt_run, "--items", tmp_path / "empty.csv", "--out", tmp_path / "v")
    assert f"{tmp_path / 'empty.csv'}:1: empty file (no header)" in line
    (tmp_path / "items.txt").write_text("a,b\n")
    line = one_line("--run", kt_run, "--items", tmp_path / "items.txt", "--out", tmp_path / "v")
    assert "expected a KT items.csv (item_id,text) or a MIND news.tsv" in line
    line = one_line("--run", kt_dir, "--items", kt_dir / "items.csv", "--out", tmp_path / "v")
    assert "not a finished gram-scale run" in line
    line = one_line("--run", kt_run, "--items", kt_dir / "items.csv", "--out", tmp_path)
    assert "is a folder; name the file to write" in line
    assert not (tmp_path / "v").exists()


# ---- plot ------------------------------------------------------------------------------------
def test_plot_draws_a_run(kt_run, tmp_path):
    """A real run: the PNG, its valid points (--eval-every's and the final one) and the
    exported best's step."""
    from gram_scale.plot import main as plot_main
    from gram_scale.plot import series

    out = tmp_path / "plots" / "kt.png"
    assert plot_main([str(kt_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = series(kt_run)
    assert [x for x, _ in s["valid"]["auc"]] == [2, 4] and s["valid"]["auc"][0][1] == BEST_AUC
    assert s["best_step"] == 2 and s["updates"] == [1, 2, 3, 4] and len(s["loss"]) == 4


def test_plot_marks_window_ends(tmp_path):
    """A Multi-step history written by hand: the encoder moved at the window ends only; a torn
    last line (a killed run) is skipped; the default PNG lands in the run folder."""
    from gram_scale.plot import main as plot_main
    from gram_scale.plot import series

    lines = [
        json.dumps(
            {
                "step": i,
                "loss": 1.0 / (i + 1),
                "encoder_updated": i in (2, 5),
                "lr_encoder": 1e-4,
                "lr_cf": 1e-3,
                **({"valid": {"auc": 0.6, "interactions": 9}} if i == 3 else {}),
            }
        )
        for i in range(7)
    ]
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')
    (tmp_path / "options.json").write_text(json.dumps({"strategy": "multi", "task": "kt"}))
    s = series(tmp_path)
    assert s["updates"] == [3, 6] and s["steps"] == 7 and s["valid"] == {"auc": [(4, 0.6)]}
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_mistakes(capsys, monkeypatch, tmp_path):
    from gram_scale.plot import main as plot_main

    def one_line(*argv) -> str:
        assert plot_main(list(map(str, argv))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "no history.jsonl" in one_line(tmp_path)
    (tmp_path / "history.jsonl").write_text("")
    assert "no step records" in one_line(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "gram_scale.plot needs matplotlib: pip install matplotlib" in one_line(tmp_path)
