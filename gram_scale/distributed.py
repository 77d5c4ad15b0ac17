"""Everything about processes and the encoder engine lives here.

- ``Comm``: rank, world size and the three collectives GRAM needs (sum, variable-length
  gather, gradient sum); one process short-circuits every call.
- ``owner_slices``: who encodes and back-propagates which unique item (contiguous balanced
  shares of the sorted global union).
- ``EncoderRunner``: encodes item rows in chunks, back-propagates a surrogate with given item
  gradients, steps the optimizer. Two back ends: plain torch (with a manual gradient sum across
  ranks, i.e. DDP semantics) and a DeepSpeed ZeRO engine prepared by Accelerate, whose
  backward/step we call ourselves because GRAM needs several backward passes per update.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist

from gram_scale.encoder import ContentEncoder, row_keys
from gram_scale.errors import InputError
from gram_scale.optim import make_optimizer
from gram_scale.schedule import make_scheduler


class Comm:
    """Collectives over all ranks (no-ops on one process)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def sum_int(self, value: int) -> int:
        """Sum of an integer over ranks."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sums of integers over ranks, in one collective."""
        if self.world == 1:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def max_int(self, value: int) -> int:
        """Max of an integer over ranks."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_reduce_(self, tensors) -> None:
        """In-place sum over ranks."""
        if self.world == 1:
            return
        for t in tensors:
            if t is None:
                continue
            moved = t.to(self.device)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (any first-dim length) in rank order."""
        if self.world == 1:
            return rows
        n = self.max_int(len(rows))
        counts = torch.tensor([len(rows)], dtype=torch.long, device=self.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(all_counts, counts)
        padded = rows.new_zeros((n, *rows.shape[1:])).to(self.device)
        padded[: len(rows)] = rows.to(self.device)
        out = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(c)] for o, c in zip(out, all_counts)]).to(rows.device)

    def union(self, items: torch.Tensor) -> torch.Tensor:
        """Sorted union of every rank's item rows."""
        return torch.unique(self.gather_rows(items.cpu()), sorted=True)


def owner_slices(n: int, world: int) -> list[slice]:
    """Balanced contiguous shares of ``n`` sorted items: rank r owns ``slices[r]``."""
    return [slice(r * n // world, (r + 1) * n // world) for r in range(world)]


class EncoderRunner:
    """Encodes item rows, back-propagates item gradients through the encoder, steps it."""

    def __init__(self, encoder: ContentEncoder, tokens, comm: Comm, opts, engine=None,
                 optimizer=None, scheduler=None):  # fmt: skip
        self.encoder = encoder  # the plain module (inside the engine when there is one)
        self.engine = engine  # DeepSpeed engine, or None
        self.optimizer = optimizer
        self.scheduler = scheduler  # torch back end only: an engine steps its own
        self.max_grad_norm = opts.max_grad_norm
        self.tokens = tokens
        self.comm = comm
        self.device = comm.device
        self.chunk = opts.encoder_batch_size
        self.keyed = opts.keyed_dropout
        self.seed = opts.seed
        self.trainable = not opts.freeze_encoder
        self.dtype = opts.vector_dtype()  # of the vectors handed to the CF model
        self.item_forwards = 0
        self.item_backwards = 0
        self._pending_backward = False
        self.peak_activation_bytes = 0  # largest encoder graph kept for a backward (activations)

    @property
    def module(self):
        return self.engine if self.engine is not None else self.encoder

    def lr(self) -> float | None:
        """The learning rate of the next encoder step (None for a frozen encoder)."""
        if not self.trainable:
            return None
        opt = self.engine.basic_optimizer if self.engine is not None else self.optimizer
        return float(opt.param_groups[0]["lr"])

    def _keys(self, items: torch.Tensor, salt: int | None):
        if salt is None or not self.keyed:
            return None
        return row_keys(items, self.seed * 1_000_003 + salt)

    def encode(self, items: torch.Tensor, salt: int | None, grad: bool) -> torch.Tensor:
        """Vectors of ``items`` in one forward call; train mode (keyed dropout by ``salt``)."""
        self.module.train()
        ids, mask = self.tokens.rows(items)
        ids, mask = ids.to(self.device), mask.to(self.device)
        keys = self._keys(items, salt)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.set_grad_enabled(grad and self.trainable):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = (
                    self.module(ids, mask, keys=keys)
                    if keys is not None
                    else self.module(ids, mask)
                )
        self.peak_activation_bytes = max(self.peak_activation_bytes, saved[0])
        self.item_forwards += len(items)
        return out.to(self.dtype)

    def backward(
        self,
        vectors: torch.Tensor,
        grads: torch.Tensor,
        last: bool = True,
        count: int | None = None,
    ) -> None:
        """Back-propagate ``sum(vectors * grads)``: each row gets exactly its item gradient.

        ``last=False`` keeps a DeepSpeed engine from treating this backward as the end of the
        accumulation (ZeRO would otherwise reduce and drop the partial gradients early);
        ``count`` overrides the rows counted (0 for a padding call)."""
        if not self.trainable:
            return
        surrogate = (vectors * grads.to(vectors.device, vectors.dtype)).sum()
        self.item_backwards += len(vectors) if count is None else count
        if self.engine is not None:
            # The engine averages gradients over ranks; ours are partial sums, so scale back up.
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(surrogate * self.comm.world)
        else:
            surrogate.backward()
        self._pending_backward = True

    def step(self) -> bool:
        """One optimizer step from the gradients back-propagated since the last step. False when
        the gradient is not finite (on any rank): the update is dropped with its gradients."""
        if not self.trainable or not self._pending_backward:
            return True
        self._pending_backward = False
        if self.engine is not None:
            # ZeRO takes the global gradient norm before it steps and skips (counting it) a step
            # whose norm is not finite, the scheduler included; it also clips here.
            skipped = self.engine.skipped_steps
            self.engine.step()
            return self.engine.skipped_steps == skipped
        params = [p for p in self.encoder.parameters() if p.grad is not None]
        self.comm.all_reduce_([p.grad for p in params])
        if not all(bool(torch.isfinite(p.grad).all()) for p in params):  # same on every rank
            self.optimizer.zero_grad(set_to_none=True)
            return False
        # Here, once: the update's gradient has arrived through several backward calls.
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def eval_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Eval-mode vectors for ``items`` (no dropout), split over ranks and gathered."""
        self.module.eval()
        mine = owner_slices(len(items), self.comm.world)[self.comm.rank]
        part = items[mine]
        n_chunks = self.comm.max_int(-(-len(part) // self.chunk))
        outs = []
        for c in range(n_chunks):
            chunk = part[c * self.chunk : (c + 1) * self.chunk]
            real = len(chunk)
            if real == 0:  # pad: every rank makes the same number of calls (ZeRO-3)
                chunk = items[:1]
            ids, mask = self.tokens.rows(chunk)
            out = self.module(ids.to(self.device), mask.to(self.device)).to(self.dtype)
            outs.append(out[:real])
        mine_vecs = (
            torch.cat(outs)
            if outs
            else torch.zeros(0, self.encoder.dim, device=self.device, dtype=self.dtype)
        )
        self.module.train()
        return self.comm.gather_rows(mine_vecs)


# ---- Accelerate / DeepSpeed setup -----------------------------------------------------------
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
    for key in ("bf16", "fp16"):
        if key in cfg:
            fill(cfg[key], "enabled", key == "bf16" and opts.precision == "bf16")
    if opts.precision == "bf16":
        cfg.setdefault("bf16", {})["enabled"] = True
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


_POSITIVE_INTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "steps_per_print")  # fmt: skip
_ZERO_BOOLS = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
               "round_robin_gradients", "stage3_gather_16bit_weights_on_model_save")  # fmt: skip
_ZERO_SIZES = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold", "stage3_max_live_parameters",
               "stage3_max_reuse_distance", "sub_group_size")  # fmt: skip
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_ds_config(cfg: dict, path: str, opts, world: int) -> int:
    """Refuse DeepSpeed settings that DeepSpeed itself would only reject after data and encoder
    loading, with a traceback: stage, precision, value types, optimizer, batch arithmetic.
    Returns the ZeRO stage. Each message names the key."""

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
    for key in _ZERO_BOOLS:
        if key in zero and not isinstance(zero[key], bool):
            raise bad(f"zero_optimization.{key}", f"must be true or false, got {zero[key]!r}")
    for key in _ZERO_SIZES:
        v = zero.get(key, "auto")
        if v != "auto" and (not _is_number(v) or v < 0):
            raise bad(f"zero_optimization.{key}", f'must be a number or "auto", got {v!r}')
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if section is None:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else None
        if device not in _OFFLOAD_DEVICES:
            raise bad(f"zero_optimization.{key}.device",
                      f"must be one of {', '.join(_OFFLOAD_DEVICES)}, got {device!r}")  # fmt: skip
        if device == "nvme" and not section.get("nvme_path"):
            raise bad(f"zero_optimization.{key}.nvme_path", "is needed with device nvme")
        if key == "offload_param" and device != "none" and stage != 3:
            raise bad(f"zero_optimization.{key}", f"needs stage 3, the config has stage {stage}")
    enabled = {}
    for key in ("fp16", "bf16"):
        section = cfg.get(key, {})
        if not isinstance(section, dict):
            raise bad(key, "must be an object")
        v = section.get("enabled", False)
        if v != "auto" and not isinstance(v, bool):
            raise bad(f"{key}.enabled", f'must be true, false or "auto", got {v!r}')
        enabled[key] = v is True or (v == "auto" and key == "bf16" and opts.precision == "bf16")
    if opts.precision == "bf16":
        enabled["bf16"] = True
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
    if "optimizer" in cfg:
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
    micro = cfg.get("train_micro_batch_size_per_gpu", "auto")
    micro = opts.encoder_batch_size if micro == "auto" else micro
    accum = cfg.get("gradient_accumulation_steps", "auto")
    accum = 1 if accum == "auto" else accum
    total = cfg.get("train_batch_size", "auto")
    if total != "auto" and total != micro * accum * world:
        raise bad("train_batch_size", f"{total} is not train_micro_batch_size_per_gpu {micro} x "
                                      f"gradient_accumulation_steps {accum} x {world} process(es) "
                                      '(set it to "auto")')  # fmt: skip
    return stage


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
    dist.init_process_group(backend, store=dist.PrefixStore(f"gram-attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)  # fmt: skip


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
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        launched = True
    if launched and not torch.cuda.is_available():
        # Without this every CPU rank believes it is rank 0 of 1 under DeepSpeed.
        kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    if launched:
        _init_process_group(timeout)
    plugin = None
    if ds_raw is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=ds_raw)
    log_with = None if opts.report_to == "none" else opts.report_to
    with quiet_stdout():
        return Accelerator(
            deepspeed_plugin=plugin,
            log_with=log_with,
            project_dir=opts.output_dir,
            kwargs_handlers=kwargs,
        )


def build_runner(accelerator, encoder: ContentEncoder, tokens, opts, ds_raw: dict | None,
                 total_steps: int = 1) -> EncoderRunner:  # fmt: skip
    """Wrap the encoder: a DeepSpeed engine when configured, else a module with its optimizer;
    either way with the LR schedule over ``total_steps`` encoder optimizer steps.

    ``accelerator=None`` (in-process tests): one CPU process, plain module."""
    if accelerator is None:
        comm = Comm()
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
        optimizer = make_optimizer(params, opts, opts.lr_encoder)
    with quiet_stdout():
        engine, optimizer = accelerator.prepare(encoder, optimizer)
    # The engine steps (in engine.step) and checkpoints the scheduler it holds. It gets ours,
    # built on the optimizer it steps, rather than a DeepSpeed WarmupLR-family one: those hold
    # the minimum rate for the first two steps and warm up over at least 2 steps, and accelerate
    # hands a client scheduler to the engine only with DeepSpeed's own optimizer.
    engine.lr_scheduler = make_scheduler(engine.basic_optimizer, opts, total_steps)
    return EncoderRunner(encoder, tokens, comm, opts, engine=engine, optimizer=optimizer)
