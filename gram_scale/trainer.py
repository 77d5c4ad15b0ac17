"""The training loop, written out: data -> token cache -> encoder + CF model -> strategy steps
-> evaluation -> exports."""

from __future__ import annotations

import gc
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gram_scale.checkpoint import (
    TrainState,
    check_compatible,
    checkpoint_root,
    choose_resume,
    resume_candidates,
)
from gram_scale.checkpoint import load as load_checkpoint
from gram_scale.checkpoint import save as save_checkpoint
from gram_scale.config import Options
from gram_scale.data.items import TokenCache
from gram_scale.data.load import data_fingerprint, load_data
from gram_scale.encoder.checks import check_encoder_folder, check_tokenizer
from gram_scale.encoder.dropout import enable_gradient_checkpointing, inputs_without_grad
from gram_scale.encoder.loading import load_encoder, resolve_attention
from gram_scale.encoder.lora import apply_lora
from gram_scale.engine import (
    build_runner,
    check_ds_config,
    in_process_device,
    launcher_cpu_mode,
    make_accelerator,
    read_ds_config,
)
from gram_scale.errors import InputError, Interrupted, TrainingStopped
from gram_scale.exchange import Comm, OwnedVectors
from gram_scale.export import (
    BEST_DIR,
    best_step,
    check_output_dir,
    check_shared_output_dir,
    clear_output_dir,
    export_run,
    publish,
    remove_partials,
    restore_best,
    stage_best,
    take_best,
)
from gram_scale.history import HISTORY_FILE, HistoryLog, resident_bytes
from gram_scale.hostmem import gathers_in_host_memory, map_large_allocations
from gram_scale.nonfinite import BadSteps
from gram_scale.optim import make_optimizer
from gram_scale.runner import TOKEN_COUNTERS, EncoderRunner
from gram_scale.schedule import make_scheduler, run_steps
from gram_scale.signals import STOP_SIGNALS, StopRequest, agreed_signal, stop_counts
from gram_scale.strategies import make_strategy, strategy_class
from gram_scale.strategies.base import CFUpdate, StepResult
from gram_scale.tasks import make_task, task_class


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        _print(text)


def _print(text: str) -> None:
    print(text, flush=True)


def catalogue_vectors(task, runner) -> OwnedVectors:
    """Fresh eval-mode encoder vectors of every catalogue item (cold-start items included, so
    they are never stale), each rank encoding the items it owns; one encode serves every split
    evaluated at that point and the export."""
    runner.comm.phase = "eval"
    try:
        return runner.owned_vectors(len(task.data.catalogue))
    finally:
        runner.comm.phase = "train"


def evaluate(task, vectors: OwnedVectors | None, split: str) -> dict:
    """Metrics of a split, each rank scoring its share; ``{"skipped": why}`` when the split has
    nothing to score (then ``vectors`` may be None)."""
    reason = task.unscorable(split)
    if reason is not None:  # the same on every rank: all hold the same data
        return {"skipped": reason}
    vectors.comm.phase = "eval"
    try:
        return task.evaluate(split, vectors.lookup, vectors.comm)
    finally:
        vectors.comm.phase = "train"


def needs_vectors(task, splits: tuple[str, ...], export: bool = False) -> bool:
    """Whether any of the splits has something to score (or the vectors are exported)."""
    return export or any(task.unscorable(split) is None for split in splits)


def better(valid: dict, best: dict | None, key: str) -> bool:
    """Whether valid metrics beat the best so far on ``key`` (higher is better; the earlier
    evaluation wins a tie, and a skipped or non-finite one never wins)."""
    value = valid.get(key)
    if "skipped" in valid or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return best is None or value > best["valid"][key]


def run_record(opts: Options, encoder: dict, stage: int | None, world: int) -> dict:
    """What a checkpoint's state depends on, in words; a resume must match it. The data, seed,
    batch size and split decide which users train and in which batches: another of them would
    resume into a different run (a new seed even moves valid and test users into training)."""
    if opts.freeze_encoder:
        training = "frozen"
    elif opts.lora:
        training = f"LoRA r {opts.lora_r} on {opts.lora_targets}"
    else:
        training = "all weights"
    cf = task_class(opts.task).cf_summary(opts)
    return {
        "strategy": opts.strategy,
        "encoder": f"{encoder['model_type']} hidden {encoder['hidden_size']} "
        f"(config.json sha256 {encoder['config_sha256'][:12]})",
        "encoder_folder": encoder["path"],
        "encoder_training": training,
        "cf_model": f"{opts.task}, {cf}",
        "deepspeed": "none" if stage is None else f"ZeRO stage {stage}, {opts.precision}",
        "processes": world,
        "data": data_fingerprint(opts),
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "split": task_class(opts.task).split_summary(opts),
    }


@dataclass
class Session:
    """Everything a run trains, built once by ``setup``."""

    data: object
    encoder: object
    tokenizer: object
    tokens: TokenCache
    task: object
    runner: EncoderRunner
    cf: CFUpdate
    strategy: object
    steps_per_epoch: int


def setup(opts: Options, data, accelerator=None, ds_raw: dict | None = None) -> Session:
    """Encoder, token cache, CF model, optimizers, LR schedules and strategy; no Accelerator =
    plain 1 process."""
    # bf16 runs under a DeepSpeed engine, which casts the encoder anyway: load it in bf16
    dtype = torch.bfloat16 if opts.precision == "bf16" and ds_raw is not None else None
    encoder, tokenizer = load_encoder(
        opts.resolved_encoder(), opts.pooling, dtype, opts.attn_implementation, opts.keyed_dropout
    )
    tokens = TokenCache.build(tokenizer, data.catalogue.texts, opts.max_tokens)
    if opts.precision == "fp64":
        encoder.double()
    if opts.gradient_checkpointing and not opts.freeze_encoder:
        enable_gradient_checkpointing(encoder)
    if opts.freeze_encoder:
        encoder.requires_grad_(False)
    elif opts.lora:
        # peft draws the adapters' initial weights from the global RNG: seed it, or they depend
        # on what ran before (launcher, back end, process count)
        torch.manual_seed(opts.seed)
        apply_lora(encoder, opts)
    if opts.gradient_checkpointing and not opts.freeze_encoder:
        inputs_without_grad(encoder)  # after LoRA: peft turns it on again
    torch.manual_seed(opts.seed)
    task = make_task(opts, data, encoder.dim)
    device = accelerator.device if accelerator is not None else in_process_device()
    task.model.to(device, opts.vector_dtype())
    cf_opt = make_optimizer(task.model.parameters(), opts, opts.lr_cf)
    steps_per_epoch = task.num_train_batches()
    total = strategy_class(opts.strategy).encoder_steps(opts, steps_per_epoch, task)
    runner = build_runner(accelerator, encoder, tokens, opts, ds_raw, total)
    cf_sched = make_scheduler(cf_opt, opts, run_steps(opts, steps_per_epoch))
    cf = CFUpdate(task, cf_opt, runner.comm, cf_sched, opts.max_grad_norm)
    strategy = make_strategy(opts, runner, cf, steps_per_epoch)
    return Session(data, encoder, tokenizer, tokens, task, runner, cf, strategy, steps_per_epoch)


def export_tensors(accelerator, opts: Options, s: Session, vectors: OwnedVectors):
    """``(encoder state, every catalogue vector)`` to export, on the main process (None
    elsewhere; an encoder state of None: the module's own); every rank calls it (under ZeRO-3
    gathering the encoder is a collective)."""
    full = vectors.full(len(s.data.catalogue))
    if s.runner.engine is not None:
        state = accelerator.get_state_dict(s.runner.engine)  # only the main process gets it
        if state is not None:
            state = {
                k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")
            }
        return state, full
    return (s.encoder.model.state_dict() if opts.lora else None), full


def _report_valid(accelerator, opts: Options, valid: dict, where: str, step: int) -> None:
    if "skipped" in valid:  # said once, with the final metrics
        return
    _say(accelerator, f"{where}: valid " + _fmt(valid))
    if opts.report_to != "none":
        accelerator.log({f"valid/{k}": v for k, v in valid.items()}, step=step)


Callback = Callable[[str, int], None]
"""``fn(event, rank)``, called by every rank at the loop's events: ``"N"`` before step N
(0-based), ``"during-N"`` inside step N (after its computation), ``"stage-N"`` while the best
export of step N is staged, ``"eval"`` before the final evaluation, ``"export"`` while the
export is written. The tests inject faults through them."""


def train(opts: Options, callbacks: Sequence[Callback] = ()) -> dict:
    """Run one training job; returns the metrics dict (also written to the output folder)."""
    checked = preflight(opts)
    if gathers_in_host_memory(checked.ds_raw, torch.cuda.is_available()):
        map_large_allocations()  # freed weights and buffers go back to the system (hostmem.py)
    accelerator = make_accelerator(opts, checked.ds_raw)
    run = Run.start(opts, checked, accelerator, callbacks)
    with run.stop:
        for epoch in range(run.state.epoch, opts.epochs):
            run.train_epoch(epoch)
            if run.out_of_steps() and epoch < opts.epochs - 1:
                break
            run.end_epoch(epoch)
        metrics = run.finish()
        signum = run.stop_after_export()
    run.close()
    if signum is not None:
        raise Interrupted("stopped during the export", said=True, code=128 + signum)
    return metrics


@dataclass
class Checked:
    """What ``preflight`` found: the DeepSpeed config to use, the run's record (what its
    checkpoints depend on), the checkpoints a resume may use, a note for the log."""

    ds_raw: dict | None
    record: dict
    candidates: list[Path]
    offline_note: str | None


def preflight(opts: Options) -> Checked:
    """Everything that flags and small files can tell, checked before any data or model
    loads: a mistake costs a second, not a training run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():  # DeepSpeed would guess the same, and say so on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and opts.batch_size < world:
        raise InputError(
            "--batch-size", None, f"{opts.batch_size} is smaller than the {world} processes"
        )
    ds_file = read_ds_config(opts.config)
    stage = None if ds_file is None else check_ds_config(ds_file, opts.config, opts, world)
    if ds_file is not None and not opts.freeze_encoder and launcher_cpu_mode():
        raise InputError(
            "--cpu",
            None,
            f"accelerate launch --cpu turns DeepSpeed off (and starts one process), but --config "
            f"{opts.config} asks for it: launch without --cpu (DeepSpeed runs on CPUs as it is) "
            "or use --config none",
        )
    encoder_id = check_encoder_folder(opts.resolved_encoder(), opts.max_tokens)
    resolve_attention(opts.attn_implementation, encoder_id["config"], opts.keyed_dropout)
    check_output_dir(opts)
    ds_raw = None if opts.freeze_encoder else ds_file  # a frozen encoder needs no engine
    record = run_record(opts, encoder_id, None if ds_raw is None else stage, world)
    offline_note = _wandb_offline(opts)
    candidates = resume_candidates(opts.output_dir, opts.resume)
    for folder in candidates:
        check_compatible(folder, record)
    check_tokenizer(opts.resolved_encoder(), opts.max_tokens, encoder_id["config"])
    return Checked(ds_raw, record, candidates, offline_note)


def _wandb_offline(opts: Options) -> str | None:
    """Never reach for the wandb cloud without a key: log locally, sync later. The note to
    say, or None."""
    if opts.report_to != "wandb" or os.environ.get("WANDB_API_KEY"):
        return None
    if os.environ.get("WANDB_MODE") not in (None, "", "offline"):
        return None
    os.environ["WANDB_MODE"] = "offline"
    return (
        f"wandb: no WANDB_API_KEY, logging offline to {opts.output_dir}/wandb (sync later with "
        "`wandb sync`)"
    )


@dataclass
class Run:
    """One training run's moving parts, from the first step to the export; its methods are the
    loop's phases."""

    opts: Options
    accelerator: object
    s: Session
    record: dict
    state: TrainState
    history: HistoryLog
    progress: object  # a tqdm bar on the main process with --progress, else None
    stop: StopRequest
    callbacks: Sequence[Callback]
    total_steps: int

    # -- start -----------------------------------------------------------------------------

    @classmethod
    def start(cls, opts: Options, checked: Checked, accelerator, callbacks) -> Run:
        """Agree on the checkpoint to resume, load data and models, clean the output folder,
        start the trackers, restore the checkpoint."""
        resume_from = _agree_resume(accelerator, opts, checked.candidates)
        with accelerator.main_process_first():  # generate the default data set once
            data = load_data(opts)
        s = setup(opts, data, accelerator, checked.ds_raw)
        if accelerator.is_main_process:  # only now: every check has passed and data loaded
            if opts.overwrite_output_dir:
                clear_output_dir(opts.output_dir)
            remove_partials(opts.output_dir)  # exports an interrupted run left unfinished
        accelerator.wait_for_everyone()
        _start_trackers(accelerator, opts, checked.offline_note)
        _say(accelerator, _header(opts, s, accelerator))
        total_steps = run_steps(opts, s.steps_per_epoch)
        progress = _progress_bar(accelerator, opts, total_steps)
        state = TrainState(s.strategy)
        _restore(accelerator, opts, s, state, resume_from)
        if progress is not None:
            progress.update(state.step)
        history = HistoryLog(
            opts.output_dir, accelerator.is_main_process, state.step if resume_from else None
        )
        # A stop signal, from the first step to the end of the export: every rank finishes what
        # it is doing (a step, the final evaluation, the export), a checkpoint keeps what was
        # trained, and the run exits with 128 + the signal's number. A second one stops at once.
        stop = StopRequest(STOP_SIGNALS if opts.save_on_signal else (signal.SIGINT,))
        parts = (opts, accelerator, s, checked.record, state, history, progress, stop)
        return cls(*parts, tuple(callbacks), total_steps)

    @property
    def comm(self) -> Comm:
        return self.s.runner.comm

    def _event(self, event: str) -> None:
        for callback in self.callbacks:
            callback(event, self.comm.rank)

    # -- the loop --------------------------------------------------------------------------

    def out_of_steps(self) -> bool:
        """Whether --max-steps is reached."""
        return bool(self.opts.max_steps) and self.state.step >= self.opts.max_steps

    def train_epoch(self, epoch: int) -> None:
        """The epoch's batches not trained yet (a resume skips those before its checkpoint),
        up to --max-steps."""
        self.s.task.model.train()
        for i, batch in enumerate(self.s.task.train_batches(epoch)):
            if i < self.state.batch_in_epoch:  # already trained before the checkpoint
                continue
            if self.out_of_steps():
                break
            self.train_step(epoch, i, batch)

    def train_step(self, epoch: int, i: int, batch) -> None:
        """One step (batch ``i`` of ``epoch``), then what follows it: counters, evaluation,
        the history line, the non-finite policy, logging, a checkpoint, the stop check."""
        state, s = self.state, self.s
        step = state.step
        self._event(f"{step}")
        lrs = {"lr_encoder": s.runner.lr(), "lr_cf": s.cf.lr()}  # the rates this step uses
        t = time.perf_counter()
        # the step's scalars (loss, counts, finite check, traffic) travel in one collective
        res = s.strategy.step(batch.slice(self.comm.rank, self.comm.world), step)
        self._event(f"during-{step}")
        seconds = time.perf_counter() - t
        state.train_seconds += seconds
        seen = self._count(res, batch)
        state.step, state.epoch, state.batch_in_epoch = step + 1, epoch, i + 1
        evaluated = self._evaluate_every(epoch)
        self.history.append(_history_line(step, epoch, res, seen, seconds, lrs, evaluated))
        self._non_finite(res, step)
        self._log_step(res, seen, lrs)
        if self.opts.save_every and state.step % self.opts.save_every == 0:
            self.checkpoint()
        self.stop_if_asked()  # a signal that came during this step (or before it)

    def _count(self, res: StepResult, batch) -> dict:
        """Add the step's counts, every rank's, to the run's counters; the step's own."""
        # the encoder's tokens and seconds (a second small collective: a window end's are
        # known only once it has run, after the step's agreement)
        tokens, seconds = self._encoder_work()
        totals = res.totals
        seen = {
            "occurrences": batch.occurrences(),  # every rank holds the global batch
            "unique": len(torch.unique(batch.items[batch.items >= 0])),
            "item_forwards": totals.item_forwards,
            "item_backwards": totals.item_backwards,
            **tokens,
        }
        counters = self.state.counters
        for key, value in seen.items():
            counters[key] += value
        for key, per_rank in (
            ("comm_bytes_sent", totals.bytes_sent),
            ("comm_bytes_received", totals.bytes_received),
        ):
            before = counters.get(key) or [0] * self.comm.world
            counters[key] = [a + b for a, b in zip(before, per_rank)]
        self.state.encoder_seconds += seconds
        return dict(seen, encoder_seconds=seconds)

    def _encoder_work(self) -> tuple[dict, float]:
        """The encoder's token counters since the last call, summed over ranks, and its
        seconds since then, the mean over ranks (one collective)."""
        runner = self.s.runner
        *sums, seconds = self.comm.sum_floats([*runner.take_tokens(), runner.clock.take()])
        # float64 holds these counts exactly
        return dict(zip(TOKEN_COUNTERS, map(int, sums))), seconds / self.comm.world

    def _evaluate_every(self, epoch: int) -> dict:
        """--eval-every's evaluation when it is due (the last step's is the final one, after
        the loop): ``{"valid": metrics}``, else {}."""
        opts, state = self.opts, self.state
        due = opts.eval_every and state.step % opts.eval_every == 0
        if not due or state.step >= self.total_steps:
            return {}
        valid = self.check_valid(epoch)
        state.evals.append({"step": state.step, "epoch": epoch, "valid": valid})
        _report_valid(self.accelerator, opts, valid, f"step {state.step}", state.step)
        return {"valid": valid}

    def _non_finite(self, res: StepResult, step: int) -> None:
        """The run's side of the non-finite policy (``gram_scale.nonfinite``): a skipped step
        is counted and said; too many in a row stop the run with a checkpoint."""
        bad = BadSteps(self.state, self.opts.max_bad_steps)
        said = bad.record(res.skipped, res.encoder_skipped, step)
        if said is None:
            return
        _say(self.accelerator, said)
        if self.opts.report_to != "none":
            self.accelerator.log(
                {"train/skipped_steps": self.state.skipped_steps}, step=self.state.step
            )
        if bad.too_many():
            raise TrainingStopped(bad.stop_message(step, self.checkpoint()))

    def _log_step(self, res: StepResult, seen: dict, lrs: dict) -> None:
        """The progress bar, and the trackers every --log-every steps."""
        state, counters = self.state, self.state.counters
        ratio = seen["occurrences"] / max(seen["unique"], 1)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{res.loss:.4f}", r=f"{ratio:.1f}")
        if self.opts.report_to == "none" or state.step % self.opts.log_every:
            return
        traffic = {
            f"train/{key}/rank{r}": v
            for key in ("comm_bytes_sent", "comm_bytes_received")
            for r, v in enumerate(counters[key])
        }
        rates = {f"train/{k}": v for k, v in lrs.items() if v is not None}
        speed = counters["occurrences"] / max(state.train_seconds, 1e-9)
        self.accelerator.log(
            {
                "train/loss": res.loss,
                "train/item_forwards": seen["item_forwards"],
                **rates,
                "train/item_backwards": seen["item_backwards"],
                "train/occurrence_unique_ratio": ratio,
                "train/items_per_s": speed,
            }
            | traffic,
            step=state.step,
        )

    def end_epoch(self, epoch: int) -> None:
        """Between epochs: the epoch's valid evaluation (--eval-every's when it fell on this
        step), the epoch record, the stop check."""
        state, last = self.state, epoch == self.opts.epochs - 1
        if not last:
            if state.evals and state.evals[-1]["step"] == state.step:  # --eval-every's
                valid = state.evals[-1]["valid"]
            else:
                valid = self.check_valid(epoch)
                _report_valid(self.accelerator, self.opts, valid, f"epoch {epoch}", state.step)
            state.epochs.append(
                {
                    "epoch": epoch,
                    "step": state.step,
                    "train_seconds": state.train_seconds,
                    "valid": valid,
                }
            )
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        if not last:
            self.stop_if_asked()  # one that came during the epoch's evaluation

    def check_valid(self, epoch: int) -> dict:
        """Valid metrics of the models as they are now; with --save-best a better one is
        staged as the export, with its test metrics. Every rank calls it.

        Under Multi-step mid-window this is the encoder as it stands: the window's table
        updates reach it only at the window end (the CF model has already learned on them)."""
        opts, s, state, accelerator = self.opts, self.s, self.state, self.accelerator
        vectors = catalogue_vectors(s.task, s.runner) if needs_vectors(s.task, ("valid",)) else None
        valid = evaluate(s.task, vectors, "valid")
        if not (opts.save_best and better(valid, state.best, s.task.main_metric)):
            return valid
        test = evaluate(s.task, vectors, "test")
        state.best = {"step": state.step, "epoch": epoch, "valid": valid, "test": test}
        encoder_state, full = export_tensors(accelerator, opts, s, vectors)
        if accelerator.is_main_process:

            def write(tmp):
                export_run(
                    tmp,
                    s.encoder,
                    s.tokenizer,
                    encoder_state,
                    s.task.model,
                    s.data.catalogue.ids,
                    full,
                    None,
                    opts,
                )
                self._event(f"stage-{state.step}")

            stage_best(opts.output_dir, state.step, write)
        return valid

    def checkpoint(self) -> Path:
        """A checkpoint of the current step, with the staged best export when there is one."""
        opts = self.opts
        best = Path(opts.output_dir) / BEST_DIR if opts.save_best else None
        return save_checkpoint(
            self.accelerator, self.state, opts.output_dir, opts.keep_checkpoints, self.record, best
        )

    # -- stop signals ----------------------------------------------------------------------

    def stop_if_asked(self, when: str = "") -> None:
        """End the run here if a stop signal came to any rank (all ranks agree)."""
        if (signum := _agreed_stop(self.stop, self.comm)) is not None:
            self._stop(signum, when)

    def _stop(self, signum: int, when: str) -> None:
        """End the run on a stop signal, between steps or before the export: checkpoint (with
        --save-on-signal or --save-every), then raise ``Interrupted`` with exit code 128 + the
        signal number. ``when``: where the run was, said before "after step N"."""
        opts, state = self.opts, self.state
        where = "no checkpoint written (--no-save-on-signal and --save-every 0)"
        if opts.save_on_signal or opts.save_every:
            path = checkpoint_root(opts.output_dir) / f"step-{state.step:08d}"
            if not (opts.save_every and state.step % opts.save_every == 0):  # not saved yet
                path = self.checkpoint()
            where = f"checkpoint {path} (continue with --resume latest)"
        if self.progress is not None:
            self.progress.close()
        message = f"stopped by {_who(self.stop, signum)} {when}after step {state.step}; {where}"
        if self.accelerator.is_main_process:
            # said before the ranks part: a launcher tears the group down when the first exits
            print(message, file=sys.stderr, flush=True)
        self.accelerator.wait_for_everyone()
        raise Interrupted(message, said=True, code=128 + signum)

    def stop_after_export(self) -> int | None:
        """A signal that came while the export was written ends the run now (the export is
        complete); its number, or None."""
        signum = _agreed_stop(self.stop, self.comm)
        if signum is not None and self.accelerator.is_main_process:
            print(
                f"stopped by {_who(self.stop, signum)} during the export, after step "
                f"{self.state.step}; the export is complete ({self.opts.output_dir}/"
                "metrics.json)",
                file=sys.stderr,
                flush=True,
            )
        self.accelerator.wait_for_everyone()
        return signum

    # -- finish ----------------------------------------------------------------------------

    def finish(self) -> dict:
        """After the last step: Multi-step's last window, the final evaluation and the export;
        returns the metrics. A stop signal before the export keeps the trained state in a
        checkpoint, whose resumed run only evaluates and exports."""
        state, task = self.state, self.s.task
        self._last_updates()
        # from here on the trained state is final: a checkpoint of it skips training on resume
        self.stop_if_asked("before the final evaluation, ")
        self._event("eval")
        # one encode serves valid, test and the exported item vectors
        final = needs_vectors(task, ("valid", "test"), export=self.opts.export)
        vectors = catalogue_vectors(task, self.s.runner) if final else None
        valid = evaluate(task, vectors, "valid")
        test = evaluate(task, vectors, "test")
        self.stop_if_asked("in the final evaluation, ")
        if self.progress is not None:
            self.progress.close()
        state.epochs.append(
            {
                "epoch": len(state.epochs),
                "step": state.step,
                "train_seconds": state.train_seconds,
                "valid": valid,
            }
        )
        best = self._best(valid, test)
        staged = best is not None and best["step"] != state.step
        metrics = self._metrics(valid, test, best, staged)
        self.history.close()
        self._report_final(valid, test, best, staged)
        self._export(metrics, vectors, best, staged)
        return metrics

    def _last_updates(self) -> None:
        """The strategy's pending work (Multi-step: a last partial window updates the
        encoder), timed and counted with training."""
        runner, counters = self.s.runner, self.state.counters
        t = time.perf_counter()
        tail = self.s.strategy.finish(self.state.step)
        self.state.train_seconds += time.perf_counter() - t
        if tail is None:
            return
        fwd, bwd = runner.comm.sum_ints([tail.item_forwards, tail.item_backwards])
        tokens, seconds = self._encoder_work()
        counters["item_forwards"] += fwd
        counters["item_backwards"] += bwd
        for key, value in tokens.items():
            counters[key] += value
        self.state.encoder_seconds += seconds

    def _best(self, valid: dict, test: dict) -> dict | None:
        """--save-best: the best evaluation, whose model the export holds (the last model when
        it is the best, or when no evaluation could be scored); None without --save-best."""
        if not self.opts.save_best:
            return None
        best, step = self.state.best, self.state.step
        if best is None or better(valid, best, self.s.task.main_metric):
            best = {"step": step, "epoch": len(self.state.epochs) - 1, "valid": valid, "test": test}
            best = best if "skipped" not in valid else None
        return best

    def _metrics(self, valid: dict, test: dict, best: dict | None, staged: bool) -> dict:
        """The run's metrics.json: the exported model's valid and test metrics, counters,
        memory and timing."""
        state, runner, key = self.state, self.s.runner, self.s.task.main_metric
        counters = state.counters
        metrics = {
            "valid": best["valid"] if staged else valid,
            "test": best["test"] if staged else test,
            "steps": state.step,
            "train_seconds": state.train_seconds,
            # of which the encoder's training calls, forward and backward (mean over ranks)
            "encoder_seconds": state.encoder_seconds,
            "encoder_flops_shape": runner.flops_shape(),
            "processes": runner.comm.world,
            "counters": counters,
            "skipped_steps": state.skipped_steps,
            "occurrence_unique_ratio": counters["occurrences"] / max(counters["unique"], 1),
            "encoder_peak_activation_bytes": runner.peak_activation_bytes,
            "encoder_recomputed_rows": runner.comm.sum_int(runner.item_recomputes),
            "encoder_numerics": runner.numerics(),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated()
            if torch.cuda.is_available()
            else None,
            "peak_rss_bytes_per_rank": _peak_rss_per_rank(runner.comm),
            "epochs": state.epochs,
            "history_file": HISTORY_FILE,  # one line per step, streamed while training
        }
        if self.opts.eval_every:
            metrics["evals"] = state.evals
        if self.opts.save_best:  # valid and test above are the exported model's
            metrics["best_step"] = None if best is None else best["step"]
            metrics["best_valid"] = None if best is None else best["valid"][key]
            metrics["last_valid"], metrics["last_test"] = valid, test
        return metrics

    def _report_final(self, valid: dict, test: dict, best: dict | None, staged: bool) -> None:
        """The final metrics on stdout and to the trackers."""
        accelerator = self.accelerator
        _say(accelerator, "final valid " + _fmt(valid))
        _say(accelerator, "final test  " + _fmt(test))
        if staged:
            _say(accelerator, f"best valid (step {best['step']}, exported) " + _fmt(best["valid"]))
            _say(accelerator, f"best test  (step {best['step']}, exported) " + _fmt(best["test"]))
        if self.opts.report_to != "none":
            final = {
                f"{split}/{k}": v
                for split, m in (("valid", valid), ("test", test))
                for k, v in m.items()
                if "skipped" not in m
            }
            accelerator.log(final, step=self.state.step)

    def _export(self, metrics: dict, vectors, best: dict | None, staged: bool) -> None:
        """Write the export (the staged best's, or the last model's) and metrics.json, from the
        main process; every rank calls it (gathering a ZeRO-3 encoder is a collective)."""
        opts, s, accelerator = self.opts, self.s, self.accelerator
        encoder_state = None
        if opts.export and not staged:
            encoder_state, vectors = export_tensors(accelerator, opts, s, vectors)
        if accelerator.is_main_process:
            if staged:
                found = best_step(opts.output_dir)
                if found != best["step"]:  # a bug: checkpoint and staging keep them together
                    raise RuntimeError(f"staged best export is of step {found}, not {best['step']}")

            def write(tmp):
                if staged:  # its encoder and vectors are in place already
                    take_best(opts.output_dir, tmp)
                encoder = s.encoder if opts.export and not staged else None
                args = (s.tokenizer, encoder_state, s.task.model, s.data.catalogue.ids)
                export_run(tmp, encoder, *args, None if staged else vectors, None, opts)
                # the main process's peak with the gathered (under ZeRO-3) and written export
                metrics["export_peak_rss_bytes"] = _own_peak_rss()
                export_run(tmp, None, *args, None, metrics, opts)  # metrics.json, options.json
                self._event("export")

            publish(opts.output_dir, write)
            shutil.rmtree(Path(opts.output_dir) / BEST_DIR, ignore_errors=True)
            print(f"wrote {opts.output_dir}/metrics.json", flush=True)
        accelerator.wait_for_everyone()

    def close(self) -> None:
        """Free the engine before the process group goes (torch 2.13 gloo can abort at exit
        otherwise); end_training also closes the trackers."""
        self.s = None
        gc.collect()
        self.accelerator.end_training()


def _agree_resume(accelerator, opts: Options, candidates: list[Path]) -> Path | None:
    """Refuse an output folder some node cannot see; the checkpoint every rank finds intact
    (each checks its own files; all agree on one), None without --resume."""
    rank, world = accelerator.process_index, accelerator.num_processes
    check_shared_output_dir(Comm(rank, world, accelerator.device), opts.output_dir)
    if not opts.resume:
        return None
    say = _print if accelerator.is_main_process else (lambda text: None)
    return choose_resume(candidates, opts.resume != "latest", say, rank, world)


def _header(opts: Options, s: Session, accelerator) -> str:
    """The run's first line: data, strategy, processes, tokens per item."""
    return (
        f"{opts.task}: {len(s.data.catalogue)} items, {s.steps_per_epoch} steps/epoch, strategy "
        f"{opts.strategy}, {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"{s.tokens.mean_tokens():.1f} tokens/item"
    )


def _history_line(
    step: int, epoch: int, res: StepResult, seen: dict, seconds: float, lrs: dict, evaluated: dict
) -> dict:
    """The history file's record of one step (``seen``: its counts, ``evaluated``: an
    --eval-every evaluation)."""
    window = {"window": res.window_stats} if res.window_stats else {}
    totals = res.totals
    return {
        "step": step,
        "epoch": epoch,
        "loss": res.loss,
        **seen,
        "comm_bytes_sent": totals.bytes_sent,
        "comm_bytes_received": totals.bytes_received,
        "encoder_updated": res.encoder_updated,
        "skipped": res.skipped,
        "encoder_skipped": res.encoder_skipped,
        "seconds": seconds,
        **lrs,
        "rss_bytes": resident_bytes(),
        **evaluated,
        **window,
    }


def _progress_bar(accelerator, opts: Options, total: int):
    """A tqdm bar on stderr, on the main process with --progress; else None."""
    if not (opts.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", file=sys.stderr, dynamic_ncols=True)


def _start_trackers(accelerator, opts: Options, offline_note: str | None) -> None:
    """The trackers of --report-to (none by default), on the main process."""
    if opts.report_to == "none":
        return
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    init = {"wandb": {"dir": opts.output_dir}} if opts.report_to == "wandb" else {}
    accelerator.init_trackers("gram-scale", config=vars(opts), init_kwargs=init)
    if offline_note:
        _say(accelerator, offline_note)


def _restore(accelerator, opts: Options, s: Session, state: TrainState, resume_from) -> None:
    """Register what checkpoints hold and restore it from ``resume_from`` (None: a fresh
    start); the staged best export follows the checkpoint."""
    accelerator.register_for_checkpointing(s.task.model, s.cf.optimizer, s.cf.scheduler, state)
    if s.runner.engine is None and s.runner.optimizer is not None:  # an engine saves itself
        accelerator.register_for_checkpointing(s.encoder, s.runner.optimizer, s.runner.scheduler)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        _say(accelerator, f"resumed from {resume_from} at step {state.step}")
    if opts.save_best and accelerator.is_main_process:
        # the best staged as of the checkpoint; a fresh start drops what an earlier try staged
        restore_best(opts.output_dir, resume_from)


def _own_peak_rss() -> int:
    """This process's peak resident memory so far, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_rss_per_rank(comm) -> list[int]:
    """Every rank's peak resident memory so far, in bytes, in rank order."""
    mine = torch.tensor([_own_peak_rss()])
    return [int(v) for v in comm.gather_rows(mine).tolist()]


def _agreed_stop(stop: StopRequest, comm) -> int | None:
    """The signal the run stops for here, or None. Every rank reads its own flag at the same
    point of its loop and adds it into one small all-reduce (none on one process), so all of
    them decide from the same sum: all stop here, or none does."""
    return agreed_signal(stop_counts(comm.sum_int(stop.code(comm.world)), comm.world))


def _who(stop: StopRequest, signum: int) -> str:
    """The stop signal's name, and whether it came to another process."""
    name = signal.Signals(signum).name
    return name if stop.received == signum else f"{name} on another process"


def _fmt(m: dict) -> str:
    if "skipped" in m:
        return f"skipped: {m['skipped']}"
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
