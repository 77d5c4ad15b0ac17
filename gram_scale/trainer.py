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
from gram_scale.encoder.dropout import enable_gradient_checkpointing
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
from gram_scale.optim import make_optimizer
from gram_scale.runner import TOKEN_COUNTERS, EncoderRunner
from gram_scale.schedule import encoder_steps, make_scheduler, run_steps
from gram_scale.signals import STOP_SIGNALS, StopRequest, agreed_signal, stop_counts
from gram_scale.strategies import make_strategy
from gram_scale.strategies.base import CFUpdate
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
    encoder, tokenizer = load_encoder(opts.resolved_encoder(), opts.pooling, dtype,
                                      opts.attn_implementation, opts.keyed_dropout)  # fmt: skip
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
    torch.manual_seed(opts.seed)
    task = make_task(opts, data, encoder.dim)
    device = accelerator.device if accelerator is not None else in_process_device()
    task.model.to(device, opts.vector_dtype())
    cf_opt = make_optimizer(task.model.parameters(), opts, opts.lr_cf)
    steps_per_epoch = task.num_train_batches()
    # Multi-step's encoder step count is estimated from one step's unique items
    first = next(task.train_batches(0), None) if opts.strategy == "multi" else None
    step_items = 0 if first is None else len(torch.unique(first.items[first.items >= 0]))
    total = encoder_steps(opts, steps_per_epoch, len(data.catalogue), step_items)
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


def check_valid(accelerator, opts: Options, s: Session, state: TrainState, epoch: int,
                fault: tuple[str | None, str] = (None, "")) -> dict:  # fmt: skip
    """Valid metrics of the models as they are now; with --save-best a better one is staged as
    the export, with its test metrics. Every rank calls it. ``fault``: ``_fault``'s, for the
    tests that stop a run while it stages.

    Under Multi-step mid-window this is the encoder as it stands: the window's table updates
    reach it only at the window end (the CF model has already learned on them)."""
    task = s.task
    vectors = catalogue_vectors(task, s.runner) if needs_vectors(task, ("valid",)) else None
    valid = evaluate(task, vectors, "valid")
    if opts.save_best and better(valid, state.best, task.main_metric):
        test = evaluate(task, vectors, "test")
        state.best = {"step": state.step, "epoch": epoch, "valid": valid, "test": test}
        encoder_state, full = export_tensors(accelerator, opts, s, vectors)
        if accelerator.is_main_process:

            def write(tmp):
                export_run(tmp, s.encoder, s.tokenizer, encoder_state, task.model,
                           s.data.catalogue.ids, full, None, opts)  # fmt: skip
                _at(fault, f"stage-{state.step}")

            stage_best(opts.output_dir, state.step, write)
    return valid


def _report_valid(accelerator, opts: Options, valid: dict, where: str, step: int) -> None:
    if "skipped" in valid:  # said once, with the final metrics
        return
    _say(accelerator, f"{where}: valid " + _fmt(valid))
    if opts.report_to != "none":
        accelerator.log({f"valid/{k}": v for k, v in valid.items()}, step=step)


def _checkpoint(accelerator, state: TrainState, opts: Options, record: dict):
    """A checkpoint of the current step, with the staged best export when there is one."""
    best = Path(opts.output_dir) / BEST_DIR if opts.save_best else None
    return save_checkpoint(accelerator, state, opts.output_dir, opts.keep_checkpoints, record,
                           best)  # fmt: skip


def train(opts: Options) -> dict:
    """Run one training job; returns the metrics dict (also written to the output folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():  # DeepSpeed would guess the same, and say so on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Everything that flags and small files can tell is checked here, before any data or model
    # loads: a mistake costs a second, not a training run.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and opts.batch_size < world:
        raise InputError(
            "--batch-size", None, f"{opts.batch_size} is smaller than the {world} processes"
        )
    ds_file = read_ds_config(opts.config)
    stage = None if ds_file is None else check_ds_config(ds_file, opts.config, opts, world)
    if ds_file is not None and not opts.freeze_encoder and launcher_cpu_mode():
        raise InputError("--cpu", None, f"accelerate launch --cpu turns DeepSpeed off (and starts "
                         f"one process), but --config {opts.config} asks for it: launch without "
                         "--cpu (DeepSpeed runs on CPUs as it is) or use --config none")  # fmt: skip
    encoder_id = check_encoder_folder(opts.resolved_encoder(), opts.max_tokens)
    resolve_attention(opts.attn_implementation, encoder_id["config"], opts.keyed_dropout)
    check_output_dir(opts)
    ds_raw = None if opts.freeze_encoder else ds_file  # a frozen encoder needs no engine
    record = run_record(opts, encoder_id, None if ds_raw is None else stage, world)
    offline_note = None
    if opts.report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        if os.environ.get("WANDB_MODE") in (None, "", "offline"):
            # never reach for the cloud without a key: log locally, sync later
            os.environ["WANDB_MODE"] = "offline"
            offline_note = f"wandb: no WANDB_API_KEY, logging offline to {opts.output_dir}/wandb (sync later with `wandb sync`)"
    candidates = resume_candidates(opts.output_dir, opts.resume)
    for folder in candidates:
        check_compatible(folder, record)
    check_tokenizer(opts.resolved_encoder(), opts.max_tokens, encoder_id["config"])

    accelerator = make_accelerator(opts, ds_raw)
    rank, world = accelerator.process_index, accelerator.num_processes
    check_shared_output_dir(Comm(rank, world, accelerator.device), opts.output_dir)
    resume_from = None
    if opts.resume:  # every rank checks its own files; all agree on one checkpoint
        say = _print if accelerator.is_main_process else (lambda text: None)
        resume_from = choose_resume(candidates, opts.resume != "latest", say, rank, world)

    with accelerator.main_process_first():  # generate the default data set once
        data = load_data(opts)
    s = setup(opts, data, accelerator, ds_raw)
    task, runner, strategy, tokens = s.task, s.runner, s.strategy, s.tokens
    encoder, steps_per_epoch = s.encoder, s.steps_per_epoch
    total_steps = run_steps(opts, steps_per_epoch)
    if accelerator.is_main_process:  # only now: every check has passed and data loaded
        if opts.overwrite_output_dir:
            clear_output_dir(opts.output_dir)
        remove_partials(opts.output_dir)  # exports an interrupted run left unfinished
    accelerator.wait_for_everyone()

    if opts.report_to != "none":
        Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
        init = {"wandb": {"dir": opts.output_dir}} if opts.report_to == "wandb" else {}
        accelerator.init_trackers("gram-scale", config=vars(opts), init_kwargs=init)
        if offline_note:
            _say(accelerator, offline_note)
    _say(accelerator, f"{opts.task}: {len(data.catalogue)} items, {steps_per_epoch} steps/epoch, "
                      f"strategy {opts.strategy}, {world} process(es) on {accelerator.device}, "
                      f"{tokens.mean_tokens():.1f} tokens/item")  # fmt: skip

    progress = None
    if opts.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, desc="train", file=sys.stderr, dynamic_ncols=True)
    state = TrainState(strategy)
    accelerator.register_for_checkpointing(task.model, s.cf.optimizer, s.cf.scheduler, state)
    if runner.engine is None and runner.optimizer is not None:  # a DeepSpeed engine saves itself
        accelerator.register_for_checkpointing(encoder, runner.optimizer, runner.scheduler)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        _say(accelerator, f"resumed from {resume_from} at step {state.step}")
    if opts.save_best and accelerator.is_main_process:
        # the best staged as of the checkpoint; a fresh start drops what an earlier try staged
        restore_best(opts.output_dir, resume_from)
    if progress is not None:
        progress.update(state.step)
    counters, epochs = state.counters, state.epochs
    history = HistoryLog(
        opts.output_dir, accelerator.is_main_process, state.step if resume_from else None
    )
    fault = _fault(rank)
    # A stop signal, from the first step to the end of the export: every rank finishes what it
    # is doing (a step, the final evaluation, the export), a checkpoint keeps what was trained,
    # and the run exits with 128 + the signal's number. A second one stops at once.
    stop = StopRequest(STOP_SIGNALS if opts.save_on_signal else (signal.SIGINT,))

    comm = runner.comm

    def stop_if_asked(when: str = "") -> None:
        if (signum := _agreed_stop(stop, comm)) is not None:
            _stop(accelerator, opts, state, record, progress, stop, signum, when)

    with stop:
        for epoch in range(state.epoch, opts.epochs):
            task.model.train()
            for i, batch in enumerate(task.train_batches(epoch)):
                if i < state.batch_in_epoch:  # already trained before the checkpoint
                    continue
                if opts.max_steps and state.step >= opts.max_steps:
                    break
                step = state.step
                _at(fault, f"{step}")  # fault injection for the resume and error tests
                lrs = {"lr_encoder": runner.lr(), "lr_cf": s.cf.lr()}  # the rates this step uses
                t = time.perf_counter()
                # the step's scalars (loss, counts, finite check, traffic) travel in one
                # collective inside the step
                res = strategy.step(batch.slice(rank, world), step)
                _at(fault, f"during-{step}")
                seconds = time.perf_counter() - t
                state.train_seconds += seconds
                # the encoder's tokens this step, every rank's (a second small collective: a
                # window end's are known only once it has run, after the step's agreement)
                tokens = dict(zip(TOKEN_COUNTERS, runner.comm.sum_ints(runner.take_tokens())))
                totals = res.totals
                fwd, bwd = totals.item_forwards, totals.item_backwards
                occurrences = batch.occurrences()  # every rank holds the global batch
                unique = len(torch.unique(batch.items[batch.items >= 0]))
                counters["occurrences"] += occurrences
                counters["unique"] += unique
                counters["item_forwards"] += fwd
                counters["item_backwards"] += bwd
                for key, value in tokens.items():
                    counters[key] += value
                for key, per_rank in (("comm_bytes_sent", totals.bytes_sent),
                                      ("comm_bytes_received", totals.bytes_received)):  # fmt: skip
                    counters[key] = [
                        a + b for a, b in zip(counters.get(key) or [0] * world, per_rank)
                    ]
                state.step, state.epoch, state.batch_in_epoch = step + 1, epoch, i + 1
                evaluated = {}
                # the last step's evaluation is the final one, after the loop
                if (
                    opts.eval_every
                    and state.step % opts.eval_every == 0
                    and state.step < total_steps
                ):
                    valid = check_valid(accelerator, opts, s, state, epoch, fault)
                    state.evals.append({"step": state.step, "epoch": epoch, "valid": valid})
                    _report_valid(accelerator, opts, valid, f"step {state.step}", state.step)
                    evaluated = {"valid": valid}
                history.append({"step": step, "epoch": epoch, "loss": res.loss, "occurrences": occurrences,
                                "unique": unique, "item_forwards": fwd, "item_backwards": bwd, **tokens,
                                "comm_bytes_sent": totals.bytes_sent, "comm_bytes_received": totals.bytes_received,
                                "encoder_updated": res.encoder_updated, "skipped": res.skipped,
                                "encoder_skipped": res.encoder_skipped,
                                "seconds": seconds, **lrs, "rss_bytes": resident_bytes(), **evaluated,
                                **({"window": res.window_stats} if res.window_stats else {})})  # fmt: skip
                if res.skipped or res.encoder_skipped:
                    state.skipped_steps += 1
                    state.bad_in_a_row += 1
                    what = "encoder gradient" if res.encoder_skipped else "loss or gradient"
                    dropped = "step" if res.skipped else "encoder update"
                    _say(accelerator, f"step {step}: non-finite {what}, {dropped} skipped "
                                      f"({state.bad_in_a_row} in a row)")  # fmt: skip
                    if opts.report_to != "none":
                        accelerator.log(
                            {"train/skipped_steps": state.skipped_steps}, step=state.step
                        )
                    if state.bad_in_a_row > opts.max_bad_steps:
                        path = _checkpoint(accelerator, state, opts, record)
                        raise TrainingStopped(
                            f"{state.bad_in_a_row} non-finite steps in a row (last: step {step}), more than "
                            f"--max-bad-steps {opts.max_bad_steps}; the last good state is saved in {path}"
                        )
                else:
                    state.bad_in_a_row = 0
                ratio = occurrences / max(unique, 1)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{res.loss:.4f}", r=f"{ratio:.1f}")
                if opts.report_to != "none" and state.step % opts.log_every == 0:
                    traffic = {f"train/{key}/rank{r}": v for key in ("comm_bytes_sent", "comm_bytes_received")
                               for r, v in enumerate(counters[key])}  # fmt: skip
                    accelerator.log({"train/loss": res.loss, "train/item_forwards": fwd,
                                     **{f"train/{k}": v for k, v in lrs.items() if v is not None},
                                     "train/item_backwards": bwd, "train/occurrence_unique_ratio": ratio,
                                     "train/items_per_s": counters["occurrences"] / max(state.train_seconds, 1e-9)}
                                    | traffic, step=state.step)  # fmt: skip
                if opts.save_every and state.step % opts.save_every == 0:
                    _checkpoint(accelerator, state, opts, record)
                stop_if_asked()  # a signal that came during this step (or before it)
            if opts.max_steps and state.step >= opts.max_steps and epoch < opts.epochs - 1:
                break
            if epoch < opts.epochs - 1:
                if state.evals and state.evals[-1]["step"] == state.step:  # --eval-every's
                    valid = state.evals[-1]["valid"]
                else:
                    valid = check_valid(accelerator, opts, s, state, epoch, fault)
                    _report_valid(accelerator, opts, valid, f"epoch {epoch}", state.step)
                epochs.append({"epoch": epoch, "step": state.step, "train_seconds": state.train_seconds,
                               "valid": valid})  # fmt: skip
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            if epoch < opts.epochs - 1:
                stop_if_asked()  # one that came during the epoch's evaluation
        metrics = _finish(accelerator, opts, s, state, history, progress, fault, stop_if_asked)
        # the export is complete: a signal that came while it was written ends the run now
        signum = _agreed_stop(stop, comm)
        if signum is not None and accelerator.is_main_process:
            print(f"stopped by {_who(stop, signum)} during the export, after step {state.step}; "
                  f"the export is complete ({opts.output_dir}/metrics.json)", file=sys.stderr,
                  flush=True)  # fmt: skip
        accelerator.wait_for_everyone()
    # Free the engine before the process group goes (torch 2.13 gloo can abort at exit
    # otherwise); end_training also closes the trackers.
    del strategy, runner, s
    gc.collect()
    accelerator.end_training()
    if signum is not None:
        raise Interrupted("stopped during the export", said=True, code=128 + signum)
    return metrics


def _finish(accelerator, opts: Options, s: Session, state: TrainState, history: HistoryLog,
            progress, fault: tuple[str | None, str], stop_if_asked) -> dict:  # fmt: skip
    """After the last step: Multi-step's last window, the final evaluation and the export;
    returns the metrics. A stop signal before the export keeps the trained state in a
    checkpoint (``stop_if_asked``), whose resumed run only evaluates and exports."""
    task, runner, strategy, data = s.task, s.runner, s.strategy, s.data
    counters, epochs = state.counters, state.epochs
    t = time.perf_counter()
    tail = strategy.finish(state.step)  # Multi-step: a last partial window updates the encoder
    state.train_seconds += time.perf_counter() - t
    if tail is not None:
        fwd, bwd, *tokens = runner.comm.sum_ints(
            [tail.item_forwards, tail.item_backwards, *runner.take_tokens()]
        )
        counters["item_forwards"] += fwd
        counters["item_backwards"] += bwd
        for key, value in zip(TOKEN_COUNTERS, tokens):
            counters[key] += value
    # from here on the trained state is final: a checkpoint of it skips training on resume
    stop_if_asked("before the final evaluation, ")
    step, train_seconds, world = state.step, state.train_seconds, runner.comm.world
    _at(fault, "eval")
    # one encode serves valid, test and the exported item vectors
    final = needs_vectors(task, ("valid", "test"), export=opts.export)
    vectors = catalogue_vectors(task, runner) if final else None
    valid = evaluate(task, vectors, "valid")
    test = evaluate(task, vectors, "test")
    stop_if_asked("in the final evaluation, ")
    if progress is not None:
        progress.close()
    epochs.append(
        {"epoch": len(epochs), "step": step, "train_seconds": train_seconds, "valid": valid}
    )
    # --save-best: the export (and the metrics that describe it) is the best evaluation's; the
    # last model's when it is the best, or when no evaluation could be scored
    best = state.best
    if opts.save_best and (best is None or better(valid, best, task.main_metric)):
        best = {"step": step, "epoch": len(epochs) - 1, "valid": valid, "test": test}
        best = best if "skipped" not in valid else None
    staged = opts.save_best and best is not None and best["step"] != step
    metrics = {
        "valid": best["valid"] if staged else valid,
        "test": best["test"] if staged else test,
        "steps": step,
        "train_seconds": train_seconds,
        "processes": world,
        "counters": counters,
        "skipped_steps": state.skipped_steps,
        "occurrence_unique_ratio": counters["occurrences"] / max(counters["unique"], 1),
        "encoder_peak_activation_bytes": runner.peak_activation_bytes,
        "encoder_recomputed_rows": runner.comm.sum_int(runner.item_recomputes),
        "encoder_numerics": runner.numerics(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes_per_rank": _peak_rss_per_rank(runner.comm),
        "epochs": epochs,
        "history_file": HISTORY_FILE,  # one line per step, streamed while training
    }
    if opts.eval_every:
        metrics["evals"] = state.evals
    if opts.save_best:  # valid and test above are the exported model's
        metrics["best_step"] = None if best is None else best["step"]
        metrics["best_valid"] = None if best is None else best["valid"][task.main_metric]
        metrics["last_valid"], metrics["last_test"] = valid, test
    history.close()
    _say(accelerator, "final valid " + _fmt(valid))
    _say(accelerator, "final test  " + _fmt(test))
    if staged:
        _say(accelerator, f"best valid (step {best['step']}, exported) " + _fmt(best["valid"]))
        _say(accelerator, f"best test  (step {best['step']}, exported) " + _fmt(best["test"]))
    if opts.report_to != "none":
        final = {f"{split}/{k}": v for split, m in (("valid", valid), ("test", test))
                 for k, v in m.items() if "skipped" not in m}  # fmt: skip
        accelerator.log(final, step=step)

    # gathered on the main process only, which writes it
    encoder_state = None
    if opts.export and not staged:
        encoder_state, vectors = export_tensors(accelerator, opts, s, vectors)
    if accelerator.is_main_process:
        if staged:
            found = best_step(opts.output_dir)
            if found != best["step"]:  # a bug: the checkpoint and the staging keep them together
                raise RuntimeError(f"staged best export is of step {found}, not {best['step']}")

            def write(tmp):
                take_best(opts.output_dir, tmp)
                export_run(tmp, None, s.tokenizer, None, task.model, data.catalogue.ids, None,
                           metrics, opts)  # fmt: skip
                _at(fault, "export")
        else:

            def write(tmp):
                export_run(tmp, s.encoder if opts.export else None, s.tokenizer, encoder_state,
                           task.model, data.catalogue.ids, vectors, metrics, opts)  # fmt: skip
                _at(fault, "export")

        publish(opts.output_dir, write)
        shutil.rmtree(Path(opts.output_dir) / BEST_DIR, ignore_errors=True)
        print(f"wrote {opts.output_dir}/metrics.json", flush=True)
    accelerator.wait_for_everyone()
    return metrics


def _peak_rss_per_rank(comm) -> list[int]:
    """Every rank's peak resident memory so far, in bytes, in rank order."""
    import resource

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])  # KiB on Linux
    return [int(v) for v in comm.gather_rows(mine).tolist()]


def _fault(rank: int) -> tuple[str | None, str]:
    """``GRAM_FAULT_KILL=RANK:WHEN[:WHAT][,RANK:WHEN[:WHAT]...]``: entry k makes that rank fail
    on elastic attempt k (the first entry on the first attempt, so a restart does not hit the
    same fault again). WHEN: ``N`` before step N (0-based), ``during-N`` inside step N (after
    its computation), ``stage-N`` while staging the best export after N steps, ``eval`` in the
    final evaluation, ``export`` while the export is written. WHAT: a signal to send itself
    (default SIGKILL), ``RuntimeError`` (a bug) or ``OOM``. ``(when, what)``, when None if
    nothing is due."""
    entries = [e for e in os.environ.get("GRAM_FAULT_KILL", "").split(",") if e]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(entries):
        return None, "SIGKILL"
    fault_rank, when, *what = entries[attempt].split(":")
    return (when if int(fault_rank) == rank else None), (what[0] if what else "SIGKILL")


def _at(fault: tuple[str | None, str], when: str) -> None:
    """Inject ``_fault``'s failure if it is due at ``when``."""
    if fault[0] == when:
        _inject(fault[1])


def _inject(what: str) -> None:
    """The failure of ``GRAM_FAULT_KILL`` (fault injection for the resume and error tests)."""
    if what == "RuntimeError":
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 64x32)")
    if what == "OOM":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    os.kill(os.getpid(), signal.Signals[what])


def _agreed_stop(stop: StopRequest, comm) -> int | None:
    """The signal the run stops for here, or None. Every rank reads its own flag at the same
    point of its loop and adds it into one small all-reduce (none on one process), so all of
    them decide from the same sum: all stop here, or none does."""
    return agreed_signal(stop_counts(comm.sum_int(stop.code(comm.world)), comm.world))


def _who(stop: StopRequest, signum: int) -> str:
    """The stop signal's name, and whether it came to another process."""
    name = signal.Signals(signum).name
    return name if stop.received == signum else f"{name} on another process"


def _stop(accelerator, opts: Options, state: TrainState, record: dict, progress,
          stop: StopRequest, signum: int, when: str = "") -> None:  # fmt: skip
    """End the run on a stop signal, between steps or before the export: checkpoint (with
    --save-on-signal or --save-every), then raise ``Interrupted`` with exit code 128 + the
    signal number. ``when``: where the run was, said before "after step N"."""
    where = "no checkpoint written (--no-save-on-signal and --save-every 0)"
    if opts.save_on_signal or opts.save_every:
        path = checkpoint_root(opts.output_dir) / f"step-{state.step:08d}"
        if not (opts.save_every and state.step % opts.save_every == 0):  # not saved yet
            path = _checkpoint(accelerator, state, opts, record)
        where = f"checkpoint {path} (continue with --resume latest)"
    if progress is not None:
        progress.close()
    message = f"stopped by {_who(stop, signum)} {when}after step {state.step}; {where}"
    if accelerator.is_main_process:
        # said before the ranks part: a launcher tears the group down when the first one exits
        print(message, file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    raise Interrupted(message, said=True, code=128 + signum)


def _fmt(m: dict) -> str:
    if "skipped" in m:
        return f"skipped: {m['skipped']}"
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
