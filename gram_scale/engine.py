"""Accelerate and DeepSpeed setup: the process group, the DeepSpeed config (filled and checked
up front) and the encoder runner built on top of them."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist

from gram_scale.encoder.model import ContentEncoder
from gram_scale.errors import InputError
from gram_scale.exchange import Comm
from gram_scale.optim import make_optimizer
from gram_scale.runner import EncoderRunner
from gram_scale.schedule import make_scheduler


def fill_ds_config(raw: dict, opts, world: int, hidden: int) -> dict:
    """Replace DeepSpeed ``"auto"`` values from our flags (we have no dataloader to infer from)."""
    import copy

    cfg = copy.deepcopy(raw)
    micro = opts.encoder_batch_size

    def fill(d: dict, key: str, value) -> None:
        if d.get(key) == "auto":
            d[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", micro)
    fill(cfg, "gradient_accumulation_steps", 1)
    fill(cfg, "train_batch_size", micro * world * int(cfg.get("gradient_accumulation_steps", 1)))
    fill(cfg, "gradient_clipping", float(opts.max_grad_norm))
    if opts.optimizer == "sgd":  # refused up front with an optimizer section
        cfg["zero_allow_untested_optimizer"] = True  # ZeRO partitions any torch optimizer
    cfg = fill_precision(cfg, opts.precision)
    if cfg.get("bf16", {}).get("enabled") is True:
        # ZeRO skips a non-finite step in bf16 only when asked (in fp32 and fp16 always)
        cfg["bf16"].setdefault("check_grad_overflow", True)
    opt = cfg.get("optimizer", {}).get("params", {})
    fill(opt, "lr", opts.lr_encoder)
    fill(opt, "weight_decay", opts.weight_decay)
    fill(opt, "betas", [0.9, 0.999])
    fill(opt, "eps", 1e-8)
    zero = cfg.get("zero_optimization", {})
    fill(zero, "reduce_bucket_size", hidden * hidden)
    fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    fill(zero, "stage3_param_persistence_threshold", 10 * hidden)
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise InputError(opts.config, None, f"cannot fill 'auto' for {', '.join(left)}")
    return cfg


def fill_precision(raw: dict, precision: str) -> dict:
    """A copy of ``raw`` with its ``bf16`` / ``fp16`` ``"auto"`` settled by ``--precision``.

    Needed before the Accelerator is made, not only when the engine is: under ZeRO-3 the encoder
    is built inside ``deepspeed.zero.Init``, which creates its partitions in the config's dtype,
    and accelerate would otherwise turn ``"auto"`` into disabled (its own mixed precision is
    ``no``): the partitions would be float32, twice the memory, and stay so in the engine."""
    import copy

    cfg = copy.deepcopy(raw)
    for key in ("bf16", "fp16"):
        if key in cfg and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = key == "bf16" and precision == "bf16"
    if precision == "bf16":
        cfg.setdefault("bf16", {})["enabled"] = True
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def read_ds_config(path: str) -> dict | None:
    """The DeepSpeed JSON named by ``--config``, or None for ``none``."""
    import json

    if path.lower() == "none":
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise InputError(path, None, f"cannot read: {exc.strerror}") from None
    if not isinstance(cfg, dict) or "zero_optimization" not in cfg:
        raise InputError(path, None, "not a DeepSpeed config (no zero_optimization section)")
    return cfg


_POSITIVE_INTS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "steps_per_print",
)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_ds_config(cfg: dict, path: str, opts, world: int) -> int:
    """Refuse DeepSpeed settings that DeepSpeed itself would only reject after data and encoder
    loading, with a traceback. Returns the ZeRO stage. Each message names the key.

    The ZeRO, fp16 and bf16 sections, as they will be filled, go through DeepSpeed's own config
    models (types, ranges, choices, unknown keys). Checked here is what those models leave out:
    the stage (Accelerate and the trainer read the raw value, where the model would also take
    ``true`` or ``"2"``), the batch sizes and gradient clipping (DeepSpeed reads them as they
    are), fp16/bf16 ``enabled`` (read raw too), the optimizer (DeepSpeed looks at it only when
    building it), ``"auto"`` only where we fill it, and the run's own constraints: precision,
    GPU, offloading needs and the batch arithmetic."""

    def bad(key: str, problem: str):
        return InputError(path, None, f"{key}: {problem}")

    zero = cfg["zero_optimization"]
    if not isinstance(zero, dict):
        raise bad("zero_optimization", "must be an object")
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise bad("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    for key in _POSITIVE_INTS:
        v = cfg.get(key, "auto")
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad(key, f'must be a positive integer or "auto", got {v!r}')
    clip = cfg.get("gradient_clipping", "auto")
    if clip != "auto" and (not _is_number(clip) or clip < 0):
        raise bad("gradient_clipping", f'must be a number >= 0 or "auto", got {clip!r}')
    _check_precision_switches(cfg, bad)
    _check_optimizer(cfg, opts, bad)
    # The config DeepSpeed will get (refused here if it has an "auto" we do not fill). Hidden
    # size 1 stands in for the encoder's, not read yet: what it sizes is valid for any width.
    try:
        filled = fill_ds_config(cfg, opts, world, hidden=1)
    except InputError as exc:
        raise InputError(path, None, exc.problem) from None
    _check_with_deepspeed_models(filled, path)
    _check_offload(filled["zero_optimization"], stage, bad)
    _check_precision(filled, opts, bad)
    _check_batch(cfg, opts, world, bad)
    return stage


def _check_precision_switches(cfg: dict, bad) -> None:
    """fp16 and bf16 are objects whose ``enabled`` is true, false or "auto" (DeepSpeed's models
    would also take "yes" or 1, but the trainer and Accelerate read the raw value)."""
    for key in ("fp16", "bf16"):
        section = cfg.get(key, {})
        if not isinstance(section, dict):
            raise bad(key, "must be an object")
        v = section.get("enabled", False)
        if v != "auto" and not isinstance(v, bool):
            raise bad(f"{key}.enabled", f'must be true, false or "auto", got {v!r}')


def _check_optimizer(cfg: dict, opts, bad) -> None:
    """An optimizer section DeepSpeed can build, and none with ``--optimizer sgd``."""
    if "optimizer" not in cfg:
        return
    if opts.optimizer == "sgd":
        raise bad("optimizer", "--optimizer sgd needs a config without an optimizer section")
    opt = cfg["optimizer"]
    kind = opt.get("type") if isinstance(opt, dict) else None
    if not isinstance(kind, str) or not _known_optimizer(kind):
        raise bad("optimizer.type", f"not an optimizer DeepSpeed knows: {kind!r}")
    if not isinstance(opt.get("params", {}), dict):
        raise bad("optimizer.params", "must be an object")
    lr = opt.get("params", {}).get("lr", "auto")
    if lr != "auto" and not _is_number(lr):
        raise bad("optimizer.params.lr", f'must be a number or "auto", got {lr!r}')


def _check_with_deepspeed_models(cfg: dict, path: str) -> None:
    """The ZeRO, fp16 and bf16 sections through the models DeepSpeed parses them with: a wrong
    type, a value out of range or not among the choices, an unknown key (nested ones too)."""
    import logging

    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils import logger
    from pydantic import ValidationError

    models = {
        "zero_optimization": DeepSpeedZeroConfig,
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,
    }
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # what it logs (deprecated keys) comes again at engine build
    try:
        for key, model in models.items():
            if key not in cfg:
                continue
            try:
                model(**cfg[key])
            except ValidationError as exc:
                raise InputError(path, None, _validation_problem(key, exc.errors()[0])) from None
            except (AssertionError, ValueError, TypeError) as exc:  # raised after validation
                raise InputError(path, None, f"{key}: {str(exc).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)


def _validation_problem(section: str, error: dict) -> str:
    """One pydantic error of a config section as ``key.path: problem, got value``."""
    key = ".".join([section, *(str(part) for part in error["loc"])])
    if error["type"] == "extra_forbidden":
        return f"{key}: DeepSpeed has no such setting"
    problem = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    problem = problem.removeprefix(f"{key} ")  # some of DeepSpeed's messages name the key
    problem = problem.replace("Input should be", "must be", 1)
    if problem[1:2].islower():  # a sentence, not a name such as ZeRO
        problem = problem[0].lower() + problem[1:]
    if not error["loc"]:  # a check across the section's keys
        return f"{key}: {problem}"
    got = error["input"]
    if ", got " in problem:  # pydantic's words already say what it got
        return f"{key}: {problem} ({got!r})"
    return f"{key}: {problem}, got {got!r}"


def _check_offload(zero: dict, stage: int, bad) -> None:
    """Offloading that DeepSpeed's models let through: NVMe without a path, and parameter
    offloading below stage 3."""
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key) or {}
        device = section.get("device", "none")
        if device == "nvme" and not section.get("nvme_path"):
            raise bad(f"zero_optimization.{key}.nvme_path", "is needed with device nvme")
        if key == "offload_param" and device != "none" and stage != 3:
            raise bad(f"zero_optimization.{key}", f"needs stage 3, the config has stage {stage}")


def _check_precision(cfg: dict, opts, bad) -> None:
    """fp16 and bf16, as filled, against each other, the machine and ``--precision``."""
    enabled = {key: cfg.get(key, {}).get("enabled") is True for key in ("fp16", "bf16")}
    if enabled["fp16"] and enabled["bf16"]:
        raise bad("fp16.enabled", "fp16 and bf16 cannot both be enabled")
    if enabled["fp16"] and not torch.cuda.is_available():
        raise bad(
            "fp16.enabled", "fp16 needs a GPU and this machine has none (use --precision bf16)"
        )
    if enabled["bf16"] and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise bad("bf16.enabled", "this GPU does not support bf16")
    if opts.precision == "fp64" and (enabled["fp16"] or enabled["bf16"]):
        key = "fp16" if enabled["fp16"] else "bf16"
        raise bad(f"{key}.enabled", "is on, but --precision fp64 runs the encoder in float64")


def _check_batch(cfg: dict, opts, world: int, bad) -> None:
    """``train_batch_size`` equals micro batch x accumulation x processes, as DeepSpeed asserts."""
    micro = cfg.get("train_micro_batch_size_per_gpu", "auto")
    micro = opts.encoder_batch_size if micro == "auto" else micro
    accum = cfg.get("gradient_accumulation_steps", "auto")
    accum = 1 if accum == "auto" else accum
    total = cfg.get("train_batch_size", "auto")
    if total != "auto" and total != micro * accum * world:
        raise bad(
            "train_batch_size",
            f"{total} is not train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x {world} process(es) "
            '(set it to "auto")',
        )


def _known_optimizer(name: str) -> bool:
    # DeepSpeed's own optimizers (its DEEPSPEED_OPTIMIZERS list), or any torch.optim class
    ours = {"adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon"}
    return name.lower() in ours or isinstance(getattr(torch.optim, name, None), type)


def _init_process_group(timeout) -> None:
    """Join the process group ourselves, keyed by the elastic restart attempt.

    After torchrun restarts the workers (``--max_restarts``), the rendezvous store still holds
    the previous attempt's keys; a plain init would make gloo connect to the dead processes'
    addresses. A store prefix per attempt gives every attempt a clean namespace. Accelerate and
    DeepSpeed then find the group initialised and use it."""
    if dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        host, port, world, is_master=(rank == 0 and not agent_store), timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"gram-attempt-{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )


@contextlib.contextmanager
def quiet_stdout():
    """Keep what libraries print while starting up (DeepSpeed's "... built successfully") off
    stdout, which carries only the run's own lines; shown on stderr if the block fails."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


_TRUE = ("1", "true", "yes", "y", "on", "t")  # what accelerate's str_to_bool takes for true


def launcher_cpu_mode() -> bool:
    """Whether ``accelerate launch --cpu`` started this process: accelerate then builds no
    DeepSpeed engine whatever the plugin says (and its launcher starts one process)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE


def make_accelerator(opts, ds_raw: dict | None):
    """An Accelerator for this run: DeepSpeed plugin when a config is given, gloo without GPUs."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    timeout = datetime.timedelta(seconds=opts.dist_timeout)
    kwargs = [InitProcessGroupKwargs(timeout=timeout)]
    launched = (
        os.environ.get("LOCAL_RANK") is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    )
    if ds_raw is not None and not launched:
        # DeepSpeed needs a process group even for one process: make a 1-rank one.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        launched = True
    if launched and not torch.cuda.is_available():
        # Without this every CPU rank believes it is rank 0 of 1 under DeepSpeed.
        kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    if launched:
        _init_process_group(timeout)
    plugin = None
    if ds_raw is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=fill_precision(ds_raw, opts.precision))
    log_with = None if opts.report_to == "none" else opts.report_to
    # Launched on CPUs without DeepSpeed, accelerate takes the ranks for one process unless told
    # they are CPU ranks: its barriers (wait_for_everyone, main_process_first) would not wait.
    cpu = launched and plugin is None and not torch.cuda.is_available()
    with quiet_stdout():
        accelerator = Accelerator(
            cpu=cpu,
            deepspeed_plugin=plugin,
            log_with=log_with,
            project_dir=opts.output_dir,
            kwargs_handlers=kwargs,
        )
    if launched and accelerator.num_processes > 1 and not accelerator.use_distributed:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} processes but no distributed run "
            f"({accelerator.distributed_type}): its barriers would not wait"
        )
    return accelerator


def in_process_device() -> torch.device:
    """The device of a run without an Accelerator (tests, benchmarks): ``$GRAM_DEVICE``, else
    the CPU; ``launch/gpu_check.sh`` sets it to run the exactness tests on a GPU."""
    return torch.device(os.environ.get("GRAM_DEVICE") or "cpu")


def build_runner(
    accelerator, encoder: ContentEncoder, tokens, opts, ds_raw: dict | None, total_steps: int = 1
) -> EncoderRunner:
    """Wrap the encoder: a DeepSpeed engine when configured, else a module with its optimizer;
    either way with the LR schedule over ``total_steps`` encoder optimizer steps.

    ``accelerator=None`` (in-process tests and benchmarks): one process, plain module, on
    ``in_process_device()``."""
    if accelerator is None:
        comm = Comm(device=in_process_device())
    else:
        comm = Comm(accelerator.process_index, accelerator.num_processes, accelerator.device)
    params = [p for p in encoder.parameters() if p.requires_grad]
    if ds_raw is None:
        encoder.to(comm.device)
        optimizer = scheduler = None
        if params:  # a frozen encoder has none
            optimizer = make_optimizer(params, opts, opts.lr_encoder)
            scheduler = make_scheduler(optimizer, opts, total_steps)
        return EncoderRunner(encoder, tokens, comm, opts, optimizer=optimizer, scheduler=scheduler)
    from accelerate.utils import DummyOptim

    cfg = fill_ds_config(ds_raw, opts, comm.world, encoder.dim)
    accelerator.state.deepspeed_plugin.deepspeed_config = cfg
    accelerator.state.deepspeed_plugin.hf_ds_config.config = cfg
    if "optimizer" in cfg:
        optimizer = DummyOptim(params, lr=opts.lr_encoder, weight_decay=opts.weight_decay)
    else:
        optimizer = make_optimizer(params, opts, opts.lr_encoder, fused=False)
    with quiet_stdout():
        engine, optimizer = accelerator.prepare(encoder, optimizer)
    # The engine steps (in engine.step) and checkpoints the scheduler it holds. It gets ours,
    # built on the optimizer it steps, rather than a DeepSpeed WarmupLR-family one: those hold
    # the minimum rate for the first two steps and warm up over at least 2 steps, and accelerate
    # hands a client scheduler to the engine only with DeepSpeed's own optimizer.
    engine.lr_scheduler = make_scheduler(engine.basic_optimizer, opts, total_steps)
    return EncoderRunner(encoder, tokens, comm, opts, engine=engine, optimizer=optimizer)
