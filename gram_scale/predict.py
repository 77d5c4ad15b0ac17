"""Score data with a finished run: ``python -m gram_scale.predict --run RUN --data DATA --out OUT``.

The run's exported encoder encodes every item of the data once; its CF model then scores with
the trainer's own evaluation code (``Task.predict`` and ``Task.metrics``), so a run's own valid
or test split (``--split``) gives back the metrics the run wrote.

- news: a MIND split folder (``behaviors.tsv``, ``news.tsv``), labelled or in the test layout
  (bare candidate ids) -> ``prediction.txt`` in the leaderboard format and ``prediction.zip``;
  with labels also ``metrics.json``. ``--topk K`` adds each user's top K news of the catalogue.
- kt: a folder with ``items.csv`` and ``interactions.csv`` (or an interactions file and
  ``--items``) -> ``predictions.csv``, one probability per interaction, and ``metrics.json``.

Launched on several processes (``accelerate launch -m gram_scale.predict ...`` or torchrun),
each rank encodes the catalogue items it owns and scores its share of the data, as the trainer's
evaluation does; the main process writes the files.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import zipfile
from pathlib import Path

import torch

from gram_scale.config import OneLineParser
from gram_scale.errors import InputError, run_command

PREDICTION_FILE = "prediction.txt"
PREDICTION_ZIP = "prediction.zip"
PREDICTIONS_CSV = "predictions.csv"
TOPK_FILE = "topk.tsv"
METRICS_FILE = "metrics.json"
SPLITS = ("valid", "test")


def _layout(path: Path) -> str | None:
    """What a data path holds: ``kt`` (items.csv / interactions.csv, or a CSV file),
    ``mind`` (a training folder: train/, dev/), ``mind-split`` (behaviors.tsv, or that file)."""
    if path.is_file():
        return {".csv": "kt", ".tsv": "mind-split"}.get(path.suffix.lower())
    if (path / "behaviors.tsv").exists():
        return "mind-split"
    if (path / "train" / "behaviors.tsv").exists() or (path / "dev").is_dir():
        return "mind"
    if (path / "interactions.csv").exists() or (path / "items.csv").exists():
        return "kt"
    return None


_KINDS = {"kt": "knowledge-tracing data", "mind": "MIND news data", "mind-split": "MIND news data"}
_WANTED = {
    "kt": "a folder with items.csv and interactions.csv, or an interactions CSV file",
    "news": "a MIND split folder with behaviors.tsv and news.tsv (or a MIND data folder with "
    "train/ and dev/ and --split valid|test)",
}


def _data_path(run, data: str | None, split: str | None) -> tuple[Path, str]:
    """The data path to score and its layout, checked against the run's task."""
    if data is None:
        if split is None:
            raise InputError(
                "--data",
                None,
                "missing: give the data to score, or --split "
                "valid|test to score the run's own split",
            )
        from gram_scale.data.load import default_data_dir

        path = Path(run.opts.data) if run.opts.data else default_data_dir(run.opts)
    else:
        path = Path(data)
    if not path.exists():
        raise InputError(path, None, "data not found")
    layout = _layout(path)
    task = run.task
    if layout is None:
        raise InputError(path, None, f"no data of a {task} run here (expected {_WANTED[task]})")
    if (task == "kt") != (layout == "kt"):
        raise InputError(
            path,
            None,
            f"is {_KINDS[layout]}, but {run.folder} is a {task} run (it scores {_WANTED[task]})",
        )
    if split is not None and (layout == "mind-split" or path.is_file()):
        raise InputError(
            "--split",
            None,
            f"picks a split of the run's training data folder; "
            f"{path} is already the data to score (drop --split)",
        )
    if split is None and layout == "mind":
        raise InputError(
            path,
            None,
            "is a MIND training data folder (train/, dev/): add --split "
            "valid|test, or give a split folder with behaviors.tsv and news.tsv",
        )
    return path, layout


def _fmt(metrics: dict) -> str:
    if "skipped" in metrics:
        return f"skipped: {metrics['skipped']}"
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _measured(task, split: str, samples: list, predictions: list, standalone: bool, comm):
    """The trainer's metrics of a split, or ``{"skipped": why}``; without the run's training
    data no item counts as cold, so the cold-start AUC is left out."""
    reason = task.unscorable(split)
    if reason is not None:
        return {"skipped": reason}
    metrics = task.metrics(samples, predictions, comm)
    if standalone:
        metrics.pop("cold_auc", None)
    return metrics


def ranks(scores: torch.Tensor) -> list[int]:
    """Each candidate's rank by score, 1 = highest (ties: the earlier candidate first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(1, len(order) + 1)
    return out.tolist()


def top_k(
    users: torch.Tensor, vectors: torch.Tensor, exclude: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's ``k`` best catalogue rows by ``users @ vectors.T``, best first, leaving out
    the rows in ``exclude`` [U, H] (-1 = none); streamed over ``chunk`` catalogue rows at a time,
    so memory holds U x (k + chunk) scores, never U x catalogue. ``(scores, rows)``, [U, k'] with
    k' = min(k, catalogue); a score of -inf marks a slot with no item left to fill it."""
    n_users = len(users)
    best = users.new_zeros(n_users, 0)
    best_rows = torch.zeros(n_users, 0, dtype=torch.long, device=users.device)
    exclude = exclude.to(users.device)
    for start in range(0, len(vectors), chunk):
        part = vectors[start : start + chunk]
        s = users @ part.T
        hit = (exclude >= start) & (exclude < start + len(part))
        who, which = hit.nonzero(as_tuple=True)
        s[who, exclude[who, which] - start] = -math.inf
        rows = torch.arange(start, start + len(part), device=users.device).expand(n_users, -1)
        s, rows = torch.cat([best, s], 1), torch.cat([best_rows, rows], 1)
        best, at = s.topk(min(k, s.shape[1]), dim=1)
        best_rows = rows.gather(1, at)
    return best, best_rows


def _user_topk(task, impressions: list, keys: list, vectors: torch.Tensor, k: int, chunk: int):
    """(user id, rows, scores) per user, first-seen order, from the user's last impression's
    history; users go through the CF model ``--eval-batch-size`` at a time."""
    last = {user: i for i, (_, user) in enumerate(keys)}
    users = list(last)
    items = torch.arange(len(vectors))
    step = task.opts.eval_batch_size
    for start in range(0, len(users), step):
        names = users[start : start + step]
        hist = task.histories([impressions[last[u]] for u in names])
        s, rows = top_k(task.user_vectors(hist, items, vectors), vectors, hist, k, chunk)
        for name, row_s, row_i in zip(names, s.cpu(), rows.cpu()):
            keep = torch.isfinite(row_s)
            yield name, row_i[keep].tolist(), row_s[keep].tolist()


def _write_news(
    folder: Path,
    data,
    split: str,
    scores: list,
    keys: list,
    topk,
    task,
    vectors,
    chunk: int,
    metrics: dict | None,
) -> None:
    from gram_scale.export import write_json

    text = folder / PREDICTION_FILE
    with open(text, "w", encoding="utf-8") as f:
        for (impression, _), s in zip(keys, scores):
            f.write(f"{impression} [{','.join(map(str, ranks(s)))}]\n")
    with zipfile.ZipFile(folder / PREDICTION_ZIP, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(text, PREDICTION_FILE)
    if topk:
        ids = data.catalogue.ids
        with open(folder / TOPK_FILE, "w", encoding="utf-8") as f:
            imps = getattr(data, split)
            for user, rows, s in _user_topk(task, imps, keys, vectors, topk, chunk):
                f.write(
                    f"{user}\t{' '.join(ids[r] for r in rows)}\t{' '.join(f'{v:.6g}' for v in s)}\n"
                )
    if metrics is not None:
        write_json(folder / METRICS_FILE, metrics)


def _scored(run, task, samples: list, lookup) -> tuple[list, list | None]:
    """(this rank's share of ``samples``, its predictions), and every rank's predictions in
    sample order on the main process (None elsewhere)."""
    from gram_scale.exchange import my_share

    share = my_share(run.comm, len(samples))
    mine = samples[share.start : share.stop]
    predictions = task.predict(mine, lookup)
    return (mine, predictions), run.comm.gather_ragged_to_main(predictions)


def _news(run, path: Path, split: str | None, topk: int, chunk: int):
    """(files writer, split name, metrics or None when unlabelled) for a news run."""
    from gram_scale.inference import empty_data

    if split is not None:
        from gram_scale.data.mind import load_mind

        data = load_mind(
            path, use_abstract=run.opts.use_abstract, seed=run.opts.seed, keep_ids=True
        )
        keys, labeled, name = data.keys[split], True, split
    else:
        from gram_scale.data.mind import read_split

        folder = path.parent if path.is_file() else path
        if path.is_file() and path.name != "behaviors.tsv":
            raise InputError(path, None, "expected a MIND behaviors.tsv (with news.tsv beside it)")
        part = read_split(folder, use_abstract=run.opts.use_abstract)
        data = empty_data("news", part.catalogue, part.impressions)
        keys, labeled, split, name = part.keys, part.labeled, "test", "data"
    task = run.task_for(data)
    vectors = run.catalogue_vectors(data.catalogue.texts)
    impressions = getattr(data, split)
    mine, scores = _scored(run, task, impressions, vectors.lookup)
    metrics = _measured(task, split, *mine, name == "data", run.comm) if labeled else None
    full = vectors.full(len(data.catalogue)) if topk else None  # --topk ranks on the main process
    record = None if metrics is None else _record(run, path, name, metrics, vectors)
    if scores is None:  # not the main process: it writes nothing
        return None, name, metrics

    def write(folder: Path) -> None:
        _write_news(folder, data, split, scores, keys, topk, task, full, chunk, record)

    return write, name, metrics


def unknown_windows(sequences: list, seq_len: int) -> tuple[list, list[tuple[int, int]]]:
    """For each interaction whose answer is unknown (-1): a window of the user's known answers
    before it, cut where the trainer's windows of ``seq_len`` would cut them, then the
    interaction itself, whose probability is that window's last. Unknown answers are never read
    as input, so each is scored as the next question after the known ones before it.
    ``(windows, (user, position) of each)``."""
    windows, where = [], []
    for u, (items, correct) in enumerate(sequences):
        known = correct >= 0
        if bool(known.all()):
            continue
        known_items, known_correct = items[known], correct[known]
        before = torch.cumsum(known.long(), 0) - known.long()  # known answers before each
        for t in (~known).nonzero().flatten().tolist():
            k = int(before[t])
            start = k - k % seq_len
            windows.append(
                (
                    torch.cat([known_items[start:k], items[t : t + 1]]),
                    torch.cat([known_correct[start:k], torch.zeros(1, dtype=torch.long)]),
                )
            )
            where.append((u, t))
    return windows, where


def _kt(run, path: Path, split: str | None, items: str | None):
    """(files writer, split name, metrics or None) for a KT run."""
    from gram_scale.inference import empty_data

    if split is not None:
        from gram_scale.data.kt import load_kt

        o = run.opts
        data = load_kt(
            path,
            seed=o.seed,
            valid_frac=o.valid_frac,
            test_frac=o.test_frac,
            cold_frac=o.cold_frac,
            keep_ids=True,
        )
        users, sequences, name = data.users[split], getattr(data, split), split
    else:
        from gram_scale.data.kt import read_interactions, read_items

        interactions = path if path.is_file() else path / "interactions.csv"
        items_file = Path(items) if items else interactions.parent / "items.csv"
        catalogue = read_items(items_file)
        log = read_interactions(interactions, catalogue)
        known = [(i[c >= 0], c[c >= 0]) for i, c in log.sequences]  # what the metrics can use
        data = empty_data("kt", catalogue, known)
        users, sequences = list(zip(log.users, log.lines)), log.sequences
        split, name = "test", "data"
    task = run.task_for(data)
    vectors = run.catalogue_vectors(data.catalogue.texts)
    windows = task.split_windows[split]  # the known answers, cut as the trainer cuts them
    mine, probs = _scored(run, task, windows, vectors.lookup)
    asks, where = unknown_windows(sequences, run.opts.seq_len)
    _, asked = _scored(run, task, asks, vectors.lookup)
    # some answers are known
    metrics = _measured(task, split, *mine, name == "data", run.comm) if windows else None
    record = None if metrics is None else _record(run, path, name, metrics, vectors)
    if probs is None:  # not the main process: it writes nothing
        return None, name, metrics

    # each user's probabilities in time order: windows cut the known answers of each user in
    # order, users one after another; an unknown answer's comes from its own window
    counts = [int((c >= 0).sum()) for _, c in sequences]
    flat = torch.cat(probs) if probs else torch.zeros(0, dtype=torch.double)
    per_user = []
    for (_, correct), p in zip(sequences, flat.split(counts)):
        full = torch.full((len(correct),), math.nan, dtype=torch.double)
        full[correct >= 0] = p
        per_user.append(full)
    for (u, t), p in zip(where, asked):
        per_user[u][t] = p[-1]

    def write(folder: Path) -> None:
        from gram_scale.export import write_json

        lines = torch.cat([at for _, at in users])
        p = torch.cat(per_user).tolist()
        rows = []
        ids = data.catalogue.ids
        for (user, _), (item_rows, correct) in zip(users, sequences):
            for item, answer in zip(item_rows.tolist(), correct.tolist()):
                rows.append((user, ids[item], "" if answer < 0 else answer))
        with open(folder / PREDICTIONS_CSV, "w", encoding="utf-8", newline="") as f:
            out = csv.writer(f)
            out.writerow(["line", "user_id", "item_id", "correct", "probability"])
            for i in torch.argsort(lines, stable=True).tolist():  # the input file's order
                out.writerow([int(lines[i]), *rows[i], f"{p[i]:.8g}"])
        if record is not None:
            write_json(folder / METRICS_FILE, record)

    return write, name, metrics


def _record(run, path: Path, name: str, metrics: dict, vectors) -> dict:
    """metrics.json of a prediction: the metrics, what they are of, and the catalogue items
    each rank encoded."""
    encoded = run.comm.sum_ints(run.comm.per_rank(len(vectors.items)))
    return {
        "run": str(run.folder),
        "data": str(path),
        "split": name,
        "best_step": run.metrics.get("best_step"),
        "metrics": metrics,
        "processes": run.comm.world,
        "encoded_items_per_process": encoded,
    }


def predict(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    data: str | None = None,
    split: str | None = None,
    topk: int = 0,
    chunk: int = 16384,
    items: str | None = None,
    device: str | None = None,
) -> dict | None:
    """Score ``data`` (or the run's own ``split``) with the run in ``run_dir``, write the
    predictions into ``out``; returns the metrics (None for unlabelled news)."""
    from gram_scale.export import check_writable, publish
    from gram_scale.inference import check_run_folder, load_run, ranks_comm

    check_run_folder(Path(run_dir))
    if split is not None and split not in SPLITS:
        raise InputError("--split", None, f"must be one of {', '.join(SPLITS)}, got {split!r}")
    if topk < 0 or chunk < 1:
        raise InputError("--topk" if topk < 0 else "--chunk", None, "must be positive")
    out = Path(out)
    check_writable(out, "--out")
    comm = ranks_comm(device)
    run = load_run(run_dir, comm.device, comm)
    if topk and run.task != "news":
        raise InputError("--topk", None, f"ranks news; {run.folder} is a {run.task} run")
    if items and run.task != "kt":
        raise InputError("--items", None, f"is for kt runs; {run.folder} is a {run.task} run")
    path, _ = _data_path(run, data, split)
    if run.task == "news":
        write, name, metrics = _news(run, path, split, topk, chunk)
    else:
        write, name, metrics = _kt(run, path, split, items)
    if write is not None:
        publish(out, write)
    comm.barrier()  # the files are in place when any rank returns
    if comm.rank == 0:
        if metrics is not None:
            print(f"{name} " + _fmt(metrics), flush=True)
        print(f"wrote {out}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gram_scale.predict`` and ``gram-predict``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = OneLineParser(prog="gram-predict", description="Score data with a finished run.")
    parser.add_argument("--run", required=True, help="a finished run's output folder")
    parser.add_argument(
        "--data",
        help="what to score: news, a MIND split folder (behaviors.tsv, "
        "news.tsv); kt, a folder with items.csv and interactions.csv or an "
        "interactions CSV (default with --split: the run's data)",
    )
    parser.add_argument("--out", required=True, help="folder for the predictions")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="score the run's own valid or test split "
        "of its training data folder (the run's seed and fractions)",
    )
    parser.add_argument(
        "--items", help="kt: the items.csv of an interactions file (default: items.csv beside it)"
    )
    parser.add_argument(
        "--topk",
        type=int,
        default=0,
        help="news: also write each user's K best "
        "news of the catalogue, clicked ones left out (topk.tsv)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=16384,
        help="--topk: catalogue items per matrix product (bounds its memory)",
    )
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)"
    )

    def body() -> None:
        a = parser.parse_args(argv)
        predict(a.run, a.out, a.data, a.split, a.topk, a.chunk, a.items, a.device)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
