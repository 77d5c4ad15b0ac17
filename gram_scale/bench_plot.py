"""``results.png`` of the benchmark: valid AUC against cumulative training time, per strategy."""

from __future__ import annotations

from pathlib import Path

from gram_scale.errors import InputError


def check() -> None:
    """Raise InputError when matplotlib is missing (it is the optional ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            None, None, "matplotlib is not installed: pip install 'gram-scale[bench]'"
        ) from None


def plot(result: dict, path: Path) -> None:
    """Write the plot; an extrapolated e2e has no accuracy, so it shows as its epoch ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    from gram_scale.bench import METRIC, machine_line, rows_in_order

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = []
    for name, row in rows_in_order(result):
        if row["extrapolated"]:
            ends = [row["time_per_epoch_s"] * (k + 1) for k in range(result["epochs"])]
            for k, x in enumerate(ends):
                ax.axvline(x, color="grey", linestyle="--", linewidth=1,
                           label=f"{name}: epoch ends, extrapolated from {row['steps']} steps "
                                 "(no accuracy)" if k == 0 else None)  # fmt: skip
            xs += ends
            continue
        points = [(t, v) for t, v in row["curve"] if v is not None]
        if not points:
            continue
        t, v = zip(*points)
        ax.plot(t, v, marker="o", label=f"{name} ({row['speedup']:.1f}x vs e2e per epoch)")
        xs += t
    if xs and max(xs) / max(min(xs), 1e-9) > 20:  # seconds to many minutes: keep all readable
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training time (s, log scale; evaluation excluded)")
    else:
        ax.set_xlabel("cumulative training time (s; evaluation excluded)")
    ax.set_ylabel(f"valid {METRIC.upper()} (after each epoch)")
    ax.set_title(f"GRAM benchmark '{result['workload']}': valid {METRIC.upper()} vs training "
                 f"time\n{machine_line(result['machine'])}", fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG under the real name
