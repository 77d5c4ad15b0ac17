"""All options of a run: one dataclass, CLI flags mirroring its fields, validated once at start."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gram_scale.errors import InputError
from gram_scale.strategies import STRATEGIES
from gram_scale.tasks import TASKS

POOLINGS = ("auto", "mean", "cls", "last")
LR_SCHEDULES = ("constant", "linear", "cosine")
REPORTERS = ("none", "wandb", "tensorboard")
PRECISIONS = ("fp32", "bf16", "fp64")
OPTIMIZERS = ("adamw", "sgd")
ATTENTIONS = ("auto", "eager", "sdpa", "flash_attention_2")
CHUNK_ORDERS = ("length", "given")  # how the chunk rule orders a call's items before cutting
SEED_MAX = 2**32 - 1  # torch.manual_seed takes more, numpy's seeds and some CUDA generators not


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Options:
    """Every option of a training run; each field is also a ``--flag``."""

    # what to train on
    task: str = _opt(
        "kt", "task: kt (knowledge tracing, DKT) or news (MIND, NRMS)", choices=tuple(TASKS)
    )
    data: str = _opt(
        "",
        "data folder (KT: items.csv + interactions.csv; news: MIND train/ and dev/); "
        "empty = a built-in synthetic set generated into the cache folder",
    )
    use_abstract: bool = _opt(False, "news: item text is title + abstract instead of the title")
    valid_frac: float = _opt(0.1, "KT: fraction of users for validation")
    test_frac: float = _opt(0.1, "KT: fraction of users for test")
    cold_frac: float = _opt(0.1, "KT: fraction of items held out of training (cold start)")
    # content encoder
    encoder: str = _opt(
        "", "Hugging Face encoder folder (loaded offline); empty = all-MiniLM-L6-v2"
    )
    pooling: str = _opt(
        "auto",
        "item vector pooling: mean over real tokens, cls (first token, encoders only), last "
        "(last real token) or auto (last for decoder-only models, mean otherwise)",
        choices=POOLINGS,
    )
    max_tokens: int = _opt(32, "max tokens per item text")
    freeze_encoder: bool = _opt(False, "never update the encoder (the frozen baseline)")
    keyed_dropout: bool = _opt(
        True,
        "encoder dropout masks keyed by (step, item) so that every strategy and rank layout "
        "draws the same masks (needed for exact equivalence with dropout on)",
    )
    gradient_checkpointing: bool = _opt(
        False,
        "recompute the encoder's activations in backward instead of keeping them (Hugging Face, "
        "non-reentrant; keyed dropout draws the same masks in the recompute): less memory, about "
        "one more forward per backward",
    )
    lora: bool = _opt(False, "train LoRA adapters (peft) instead of all encoder weights")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch")
    lora_targets: str = _opt(
        "auto",
        "comma-separated module names that get adapters, or auto: the attention query and value "
        "projections of the architecture (query,value; q_proj,v_proj; GPT-2 c_attn)",
    )
    # GRAM
    strategy: str = _opt(
        "single", "e2e, single (GRAM single-step) or multi", choices=tuple(STRATEGIES)
    )
    window: str = _opt("1E", "multi: encoder update latency, in steps (10) or epochs (0.5E, 1E)")
    table_lr: float = _opt(
        1.0,
        "multi: plain-SGD rate of the item table inside a window, on the gradient of the "
        "batch-mean CF loss",
    )
    table_optimizer: str = _opt(
        "sgd",
        "multi: how table rows move inside a window: sgd (the paper's rule, rate --table-lr) or "
        "adam (per-row Adam at --table-lr, state for touched rows only)",
        choices=("sgd", "adam"),
    )
    target_distance: float = _opt(
        4.0,
        "multi: the window-end targets lie along each item's accumulated gradient, this many "
        "mean vector norms from the cached vectors on average (the rate is set at each window "
        "end from the window's mean |vector| / mean |gradient|); 0 = a fixed rate, --target-lr",
    )
    regress_weights: str = _opt(
        "none",
        "multi: per-item weight of the window-end regression: none or sqrt-count (sqrt of the "
        "steps that touched the item over the window's largest)",
        choices=("none", "sqrt-count"),
    )
    cf_refresh: str = _opt(
        "auto",
        "multi: after each encoder update, the CF model replays the window's last N batches on "
        "the updated encoder's vectors (CF-only steps), so it meets the vectors it is evaluated "
        "on (N, 0 = off, or auto: the whole window, at most 20 batches)",
        metavar="N|auto",
    )
    cf_refresh_merge: int = _opt(
        1,
        "multi: the refresh's replayed batches merged K at a time into one CF step (1 = a step "
        "per batch). 2 trades accuracy for fewer CF steps: 0.1-0.3 AUC point on the "
        "fine-tuning workloads' selection seeds (docs/multistep.md)",
        metavar="K",
    )
    last_window: str = _opt(
        "cf",
        "multi: the run's last window, in a run of two or more windows: cf (the CF model trains "
        "on the previous update's vectors and the run ends without an encoder update: no CF "
        "window would follow it, and on average a last update lowered the final valid AUC of "
        "every fine-tuning workload; it saves one window end) or update (an encoder update and "
        "the refresh, as after every window: the paper's rule)",
        choices=("cf", "update"),
    )
    regress_lr: str = _opt(
        "auto",
        "multi: the window-end regression's learning rate, --lr-encoder x a factor from the "
        "window's steps over its regression steps (each regression step carries that many CF "
        "steps' gradients): sqrt (its square root, 1x to 2x: Adam's rule for a larger batch), "
        "linear (the ratio itself, 1x to 4x), same (1x), or auto (linear when the first "
        "window's accumulated CF gradients are at least 0.006 of their rows' vector norms x "
        "sqrt(steps that touched the row), summed over the rows; else sqrt; chosen once, kept "
        "for the run)",
        choices=("auto", "sqrt", "linear", "same"),
    )
    target_lr: float = _opt(
        0.0,
        "multi: the window-end regression targets are the cached vectors moved by this rate x "
        "the accumulated gradient (0 = --table-lr: the rows the CF model read)",
    )
    encoder_batch_size: int = _opt(
        64, "items per encoder call: bounds encoder memory (Single-step, window ends, evaluation)"
    )
    encoder_tokens: int = _opt(
        8192,
        "the encoder's memory budget in padded tokens (rows x longest text): no encoder call "
        "holds more, and Single-step keeps a step's whole encoder graph (one forward per item) "
        "when its calls hold at most this many, else it re-encodes chunk by chunk; 0 = calls cut "
        "by rows only, and Single-step keeps the graph only of a step that fits one call",
    )
    chunk_order: str = _opt(
        "length",
        "how the chunk rule orders the items of every encode before cutting them into calls: "
        "length (by token length, stable, so short texts are not padded to long ones) or given "
        "(the items' own order, no sort: to measure what the sort saves). An item's vector "
        "does not depend on its call, so it changes padded tokens and time, not results (up "
        "to float rounding)",
        choices=CHUNK_ORDERS,
    )
    encoder_epochs: int = _opt(1, "multi: regression passes over the window's items")
    regress_batch_size: str = _opt(
        "auto",
        "multi: touched items per encoder optimizer step at a window end (N, or auto: the "
        "window's touched items / its steps, rounded up, so a window of N steps makes about N "
        "encoder steps)",
        metavar="N|auto",
    )
    # CF model and optimisation
    epochs: int = _opt(2, "training epochs")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = no limit)")
    batch_size: int = _opt(32, "global CF batch: KT sequences or news training samples")
    seq_len: int = _opt(50, "KT: interactions per training sequence window")
    history_len: int = _opt(50, "news: clicked news per user history (latest kept)")
    negatives: int = _opt(4, "news: non-clicked candidates per clicked one (K)")
    cf_layers: int = _opt(2, "KT: LSTM layers")
    cf_heads: int = _opt(4, "news: self-attention heads")
    cf_dropout: float = _opt(0.1, "dropout inside the CF model")
    optimizer: str = _opt(
        "adamw",
        "adamw, or sgd (plain SGD, no momentum; needs a DeepSpeed config without an optimizer "
        "section) for encoder and CF model",
        choices=OPTIMIZERS,
    )
    lr_encoder: float = _opt(5e-5, "encoder learning rate")
    lr_cf: float = _opt(1e-3, "CF model learning rate")
    weight_decay: float = _opt(0.0, "weight decay (both optimizers)")
    lr_schedule: str = _opt(
        "constant",
        "learning-rate schedule of both optimizers after the warmup: constant, linear or cosine "
        "decay to 0 over each optimizer's own steps",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = _opt(
        0, "linear warmup over this many steps of each optimizer (the encoder's own steps)"
    )
    max_grad_norm: float = _opt(
        0.0, "clip each optimizer's gradient to this global L2 norm (0 = off)"
    )
    attn_implementation: str = _opt(
        "auto",
        "encoder attention kernel: auto = sdpa, or eager when the encoder's attention dropout is "
        "on and keyed (sdpa and flash attention draw their dropout inside the kernel, where "
        "keyed masks cannot reach)",
        choices=ATTENTIONS,
    )
    eval_batch_size: int = _opt(256, "sequences or impressions per evaluation batch")
    seed: int = _opt(0, "random seed (data split, initialisation, order, dropout)")
    # run
    config: str = _opt(
        "none", "DeepSpeed JSON for the encoder (ds_configs/zero2.json ...) or none", metavar="PATH"
    )
    precision: str = _opt(
        "fp32",
        "fp32, bf16 (under DeepSpeed: encoder weights in bf16; without: bf16 autocast of the "
        "encoder) or fp64 (encoder, CF model and item table in float64: slow, for checking "
        "exactness)",
        choices=PRECISIONS,
    )
    output_dir: str = _opt("outputs/run", "where metrics, options and exports are written")
    overwrite_output_dir: bool = _opt(
        False,
        "remove an earlier run's outputs from --output-dir first (else such a folder is refused)",
    )
    cache_dir: str = _opt("", "generated data and token caches; empty = $GRAM_CACHE or ~/.cache")
    log_every: int = _opt(10, "log training loss every this many steps")
    eval_every: int = _opt(
        0,
        "also evaluate on the valid split every this many steps (0 = only at epoch ends and at "
        "the end of training)",
    )
    save_best: bool = _opt(
        False,
        "export the encoder, CF model and item vectors of the best valid main metric (over every "
        "evaluation) instead of the last step's; metrics.json names its step",
    )
    max_bad_steps: int = _opt(
        5,
        "consecutive non-finite steps tolerated (skipped); one more stops the run with a checkpoint",
    )
    dist_timeout: int = _opt(
        1800, "seconds a collective may wait for a lost process before failing"
    )
    save_every: int = _opt(0, "write a checkpoint every this many steps (0 = never)")
    keep_checkpoints: int = _opt(2, "checkpoints kept (older ones are deleted)")
    save_on_signal: bool = _opt(
        True,
        "on SIGTERM (preemption), SIGUSR1 (Slurm's warning before a time limit) or Ctrl-C, every "
        "rank finishes its step, a checkpoint is written and the run exits with 128 + the signal "
        "number; off: SIGTERM and SIGUSR1 act as usual and Ctrl-C checkpoints only with "
        "--save-every",
    )
    resume: str = _opt(
        "", "resume from a checkpoint folder, or 'latest' in --output-dir", metavar="PATH|latest"
    )
    report_to: str = _opt("none", "tracker: none, wandb or tensorboard", choices=REPORTERS)
    export: bool = _opt(True, "write the encoder folder, CF weights and item vectors")
    progress: bool = _opt(True, "show a progress bar")

    # -- derived ---------------------------------------------------------------------------
    def window_spec(self) -> tuple[str, float]:
        """('steps', n) or ('epochs', fraction)."""
        return parse_window(self.window)

    def refresh_steps(self, window: int) -> int:
        """``--cf-refresh`` as a number of batches, for a window of ``window`` steps."""
        n = parse_count("--cf-refresh", self.cf_refresh, minimum=0)
        return min(20, window) if n is None else n

    def regress_batch(self) -> int | None:
        """``--regress-batch-size`` as a number of items, None for auto."""
        return parse_regress_batch(self.regress_batch_size)

    def vector_dtype(self):
        """dtype of item vectors, item gradients, the item table and the CF model."""
        import torch  # only when asked: parsing flags stays light

        return torch.float64 if self.precision == "fp64" else torch.float32

    def resolved_cache_dir(self) -> Path:
        """The cache folder for generated data."""
        if self.cache_dir:
            return Path(self.cache_dir)
        env = os.environ.get("GRAM_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "gram-scale"

    def resolved_encoder(self) -> str:
        """The encoder folder: ``--encoder``, else the packaged all-MiniLM-L6-v2."""
        # imports torch: only when asked
        from gram_scale.encoder.loading import default_encoder_path

        return self.encoder or default_encoder_path()

    def to_json(self) -> str:
        """The options as JSON (written next to the outputs)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


_WINDOW = re.compile(r"^(?:(\d+)|(\d*\.?\d+)[eE])$")


def parse_window(text: str) -> tuple[str, float]:
    """Parse ``--window``: ``N`` steps or ``F E`` epochs."""
    m = _WINDOW.match(str(text).strip())
    if not m:
        raise InputError(
            "--window", None, f"expected a number of steps (10) or epochs (0.5E, 1E), got {text!r}"
        )
    if m.group(1) is not None:
        n = int(m.group(1))
        if n < 1:
            raise InputError("--window", None, f"must be at least 1 step, got {text!r}")
        return "steps", float(n)
    frac = float(m.group(2))
    if frac <= 0:
        raise InputError("--window", None, f"must be a positive fraction of an epoch, got {text!r}")
    return "epochs", frac


def parse_count(flag: str, text: str, minimum: int = 1) -> int | None:
    """Parse a count flag that also takes ``auto`` (None)."""
    text = str(text).strip()
    if text.lower() == "auto":
        return None
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise InputError(flag, None, f"expected a number >= {minimum} or auto, got {text!r}")
    return int(text)


def parse_regress_batch(text: str) -> int | None:
    """Parse ``--regress-batch-size``: a positive number of items, or None for ``auto``."""
    text = str(text).strip()
    if text.lower() == "auto":
        return None
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        why = f"expected a positive number of items or auto, got {text!r}"
        raise InputError("--regress-batch-size", None, why)
    return int(text)


def validate(opts: Options) -> Options:
    """Check every value once; the first bad one raises InputError naming the flag."""
    _check_choices(opts)
    _check_counts(opts)
    _check_rates(opts)
    parse_window(opts.window)
    parse_regress_batch(opts.regress_batch_size)
    parse_count("--cf-refresh", opts.cf_refresh, minimum=0)
    _check_paths(opts)
    _check_conflicts(opts)
    return opts


def _check_choices(opts: Options) -> None:
    for f in dataclasses.fields(opts):
        choices = f.metadata.get("choices")
        if choices and getattr(opts, f.name) not in choices:
            raise InputError(
                _flag(f.name),
                None,
                f"must be one of {', '.join(choices)}, got {getattr(opts, f.name)!r}",
            )


def _check_counts(opts: Options) -> None:
    positive = [
        "max_tokens",
        "encoder_batch_size",
        "encoder_epochs",
        "epochs",
        "batch_size",
        "seq_len",
        "history_len",
        "negatives",
        "cf_layers",
        "cf_heads",
        "eval_batch_size",
        "log_every",
        "cf_refresh_merge",
    ]
    for name in positive:
        if getattr(opts, name) < 1:
            raise InputError(_flag(name), None, f"must be at least 1, got {getattr(opts, name)}")
    if opts.encoder_tokens and opts.encoder_tokens < opts.max_tokens:
        why = f"must be 0 or at least --max-tokens ({opts.max_tokens}), got {opts.encoder_tokens}"
        raise InputError("--encoder-tokens", None, why)
    if opts.max_bad_steps < 0:
        raise InputError("--max-bad-steps", None, f"must be 0 or more, got {opts.max_bad_steps}")
    if opts.dist_timeout < 1:
        raise InputError(
            "--dist-timeout", None, f"must be at least 1 second, got {opts.dist_timeout}"
        )
    if opts.save_every < 0:
        raise InputError("--save-every", None, f"must be 0 or more, got {opts.save_every}")
    if opts.eval_every < 0:
        raise InputError("--eval-every", None, f"must be 0 or more, got {opts.eval_every}")
    if opts.keep_checkpoints < 1:
        raise InputError(
            "--keep-checkpoints", None, f"must be at least 1, got {opts.keep_checkpoints}"
        )
    if opts.max_steps < 0:
        raise InputError("--max-steps", None, f"must be 0 or more, got {opts.max_steps}")


def _check_rates(opts: Options) -> None:
    for name in ("lr_encoder", "lr_cf", "table_lr"):
        if not getattr(opts, name) > 0:
            raise InputError(_flag(name), None, f"must be positive, got {getattr(opts, name)}")
    if not opts.target_lr >= 0:
        raise InputError("--target-lr", None, f"must be 0 or more, got {opts.target_lr}")
    if not 0 <= opts.target_distance < float("inf"):
        why = f"must be 0 or more (and finite), got {opts.target_distance}"
        raise InputError("--target-distance", None, why)
    if opts.weight_decay < 0:
        raise InputError("--weight-decay", None, f"must be 0 or more, got {opts.weight_decay}")
    if opts.warmup_steps < 0:
        raise InputError("--warmup-steps", None, f"must be 0 or more, got {opts.warmup_steps}")
    if not opts.max_grad_norm >= 0:
        raise InputError("--max-grad-norm", None, f"must be 0 or more, got {opts.max_grad_norm}")
    if opts.lora_r < 1:
        raise InputError("--lora-r", None, f"must be at least 1, got {opts.lora_r}")
    if not opts.lora_alpha > 0:  # 0 silences the adapters, a negative alpha flips them
        raise InputError("--lora-alpha", None, f"must be positive, got {opts.lora_alpha}")
    if not 0 <= opts.lora_dropout < 1:
        raise InputError("--lora-dropout", None, f"must be in [0, 1), got {opts.lora_dropout}")
    if not [t for t in opts.lora_targets.split(",") if t.strip()]:
        raise InputError("--lora-targets", None, "names no module")
    if not 0 <= opts.cf_dropout < 1:
        raise InputError("--cf-dropout", None, f"must be in [0, 1), got {opts.cf_dropout}")
    for name in ("valid_frac", "test_frac", "cold_frac"):
        if not 0 <= getattr(opts, name) < 1:
            raise InputError(_flag(name), None, f"must be in [0, 1), got {getattr(opts, name)}")
    if opts.valid_frac + opts.test_frac >= 1:
        raise InputError("--valid-frac", None, "valid and test fractions leave no training users")
    for f in dataclasses.fields(opts):  # inf passes every bound above and trains to NaN
        value = getattr(opts, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(_flag(f.name), None, f"must be a finite number, got {value}")
    if not 0 <= opts.seed <= SEED_MAX:
        raise InputError("--seed", None, f"must be in 0..{SEED_MAX}, got {opts.seed}")


def _check_paths(opts: Options) -> None:
    if not opts.output_dir.strip():
        raise InputError("--output-dir", None, "is empty; name a folder (e.g. outputs/run)")
    _check_cache_dir(opts.cache_dir)
    _check_tracker(opts.report_to)
    if opts.data and not Path(opts.data).is_dir():
        raise InputError(opts.data, None, "data folder not found")
    if opts.encoder and not (Path(opts.encoder) / "config.json").is_file():
        raise InputError(opts.encoder, None, "not a Hugging Face model folder (no config.json)")
    if opts.config.lower() != "none" and not Path(opts.config).is_file():
        raise InputError(opts.config, None, "DeepSpeed config file not found")


def _check_cache_dir(cache_dir: str) -> None:
    """Refuse a ``--cache-dir`` that is a file, or lies under one (creates nothing)."""
    if not cache_dir:
        return
    folder = Path(cache_dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise InputError("--cache-dir", None, f"{folder} {what}, not a folder")


# --report-to: the packages accelerate's tracker imports (TensorBoard: either writer)
TRACKER_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}


def _check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing: accelerate would only warn and track nothing."""
    packages = TRACKER_PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise InputError(
            "--report-to",
            None,
            f"{report_to} is not installed (pip install {packages[0]}), or use --report-to none",
        )


def _check_conflicts(opts: Options) -> None:
    """Pairs of flags that cannot work together; each would otherwise be silently ignored or
    fail only after training."""
    if opts.lora and opts.freeze_encoder:
        raise InputError(
            "--lora",
            None,
            "cannot be combined with --freeze-encoder (a frozen encoder trains no adapters)",
        )
    if opts.precision == "bf16" and opts.freeze_encoder:
        raise InputError(
            "--precision", None, "bf16 applies to the trained encoder; --freeze-encoder trains none"
        )
    if opts.save_best and not opts.export:
        raise InputError("--save-best", None, "has nothing to save with --no-export")
    if opts.overwrite_output_dir and opts.resume:
        raise InputError(
            "--overwrite-output-dir",
            None,
            "cannot be combined with --resume (it would delete the checkpoints to resume from)",
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are InputErrors: one line and exit 2, no usage dump."""

    def error(self, message: str):
        raise InputError(None, None, f"{self.prog}: {message}")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """An argparse parser with one flag per Options field."""
    parser = OneLineParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Options):
        kw = {"default": f.default, "help": f.metadata["help"], "dest": f.name}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type), str)
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
            if "choices" in f.metadata:
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(_flag(f.name), **kw)
    return parser


def parse_options(argv: list[str] | None = None, prog: str = "train.py") -> Options:
    """Parse and validate command-line flags."""
    ns = build_parser(prog).parse_args(argv)
    return validate(Options(**vars(ns)))
