"""Draw a run's ``history.jsonl`` as one PNG: ``python -m gram_scale.plot RUN_DIR [--out FILE]``.

Four panels against steps trained: the training loss, the valid metrics (``--eval-every``'s,
the epoch ends' and the final one; the exported best marked), the two learning rates, and the
steps that updated the encoder (every step under e2e and single, the window ends under multi).
Needs matplotlib (the ``bench`` extra installs it).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from gram_scale.config import OneLineParser
from gram_scale.errors import InputError, run_command
from gram_scale.history import HISTORY_FILE
from gram_scale.strategies import strategy_class

PLOT_FILE = "history.png"
_COUNTS = ("interactions", "impressions")  # metrics that are sizes, not scores


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_records(path: Path) -> list[dict]:
    """The step records of a history file; a torn line (a run killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def series(folder: Path) -> dict:
    """What the plot draws, by steps trained: ``loss``, ``skipped``, ``valid`` (metric -> points),
    ``lr_encoder``, ``lr_cf``, ``updates`` (steps that moved the encoder), ``best_step``,
    ``steps`` and the run's ``strategy`` and ``task``."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        raise InputError(folder, None, f"no {HISTORY_FILE} (not a gram-scale run's output folder)")
    records = read_records(path)
    if not records:
        raise InputError(path, None, "no step records (the run took no step)")
    metrics = _json(folder / "metrics.json")
    opts = _json(folder / "options.json")
    by_step: dict[int, dict] = {}
    for r in records:  # --eval-every's evaluations, on the line of the step they follow
        if isinstance(r.get("valid"), dict):
            by_step[r["step"] + 1] = r["valid"]
    for e in metrics.get("epochs", []):  # the epoch ends' and the final evaluation
        if isinstance(e, dict) and isinstance(e.get("valid"), dict):
            by_step.setdefault(e.get("step"), e["valid"])
    valid: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(s for s in by_step if isinstance(s, int)):
        for name, value in by_step[step].items():
            if name not in _COUNTS and _finite(value):
                valid.setdefault(name, []).append((step, float(value)))

    def points(key: str) -> list[tuple[int, float]]:
        return [(r["step"] + 1, float(r[key])) for r in records if _finite(r.get(key))]

    return {
        "loss": points("loss"),
        "skipped": [r["step"] + 1 for r in records if r.get("skipped")],
        "valid": valid,
        "lr_encoder": points("lr_encoder"),
        "lr_cf": points("lr_cf"),
        "updates": [r["step"] + 1 for r in records if r.get("encoder_updated")],
        "best_step": metrics.get("best_step"),
        "steps": records[-1]["step"] + 1,
        "strategy": opts.get("strategy", "?"),
        "task": opts.get("task", "?"),
    }


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a run still training has no metrics.json or options.json yet
    return value if isinstance(value, dict) else {}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError(
            None,
            None,
            "gram_scale.plot needs matplotlib: pip install matplotlib "
            "(or the bench extra: pip install 'gram-scale[bench]')",
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's history into ``out`` (default ``RUN_DIR/history.png``); returns the path."""
    plt = _pyplot()
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InputError(folder, None, "run folder not found")
    s = series(folder)
    out = Path(out) if out is not None else folder / PLOT_FILE
    if out.is_dir():
        raise InputError("--out", None, f"{out} is a folder; name the PNG file to write")

    fig, (loss, valid, lrs, updates) = plt.subplots(
        4, 1, figsize=(9, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 1]}
    )
    fig.suptitle(f"{folder.name}: {s['task']}, {s['strategy']}, {s['steps']} steps")
    if s["loss"]:
        x, y = zip(*s["loss"])
        width = max(1, len(y) // 50)  # a running mean over 2% of the steps shows the trend
        loss.plot(x, y, lw=0.6, alpha=0.4 if width > 1 else 1.0, color="C0", label="loss")
        if width > 1:
            smooth = [
                sum(y[max(0, i - width + 1) : i + 1]) / (i - max(0, i - width + 1) + 1)
                for i in range(len(y))
            ]
            loss.plot(x, smooth, color="C0", label=f"mean of {width} steps")
    for step in s["skipped"]:
        loss.axvline(step, color="red", lw=0.5, alpha=0.5)
    loss.set_ylabel("training loss")
    loss.legend(loc="upper right", fontsize="small")

    for i, (name, pts) in enumerate(sorted(s["valid"].items())):
        x, y = zip(*pts)
        valid.plot(x, y, marker="o", ms=3, color=f"C{i}", label=name)
    if isinstance(s["best_step"], int):
        valid.axvline(s["best_step"], color="gray", ls="--", lw=1, label="exported best")
    valid.set_ylabel("valid")
    if s["valid"]:
        valid.legend(loc="lower right", fontsize="small", ncol=3)
    else:
        valid.text(0.5, 0.5, "no valid evaluation", ha="center", transform=valid.transAxes)

    for key, color, style in (("lr_encoder", "C1", "-"), ("lr_cf", "C2", "--")):
        if s[key]:
            x, y = zip(*s[key])
            lrs.plot(x, y, color=color, ls=style, label=key)
    if all(v > 0 for key in ("lr_encoder", "lr_cf") for _, v in s[key]):
        lrs.set_yscale("log")  # the two rates are often orders of magnitude apart
    lrs.set_ylabel("learning rate")
    if s["lr_encoder"] or s["lr_cf"]:
        lrs.legend(loc="upper right", fontsize="small")

    what = strategy_class(s["strategy"]).updates
    updates.eventplot([s["updates"]], lineoffsets=0.5, linelengths=0.8, colors="C3")
    updates.set_yticks([])
    updates.set_title(f"{what}: {len(s['updates'])} of {s['steps']} steps", fontsize="small")
    updates.set_xlabel("steps trained")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gram_scale.plot``."""
    parser = OneLineParser(
        prog="python -m gram_scale.plot", description="Draw a run's history.jsonl as one PNG."
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a run's output folder")
    parser.add_argument("--out", help=f"the PNG to write (default: RUN_DIR/{PLOT_FILE})")

    def body() -> None:
        a = parser.parse_args(argv)
        plot(a.run, a.out)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
