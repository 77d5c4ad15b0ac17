"""The encoder runner: encodes item rows in chunks, back-propagates a surrogate with given item
gradients, steps the optimizer, and keeps a frozen encoder's vectors (each item encoded once per
run).

Every encode cuts its items by one chunk rule (``TokenCache.cut``): sorted by token length
(``--chunk-order length``; ``given`` keeps the items' order), at most ``--encoder-batch-size``
rows and ``--encoder-tokens`` padded tokens a call. Two back ends: plain torch (with a manual gradient sum across
ranks, i.e. DDP semantics) and a DeepSpeed ZeRO engine prepared by Accelerate, whose
backward/step we call ourselves because GRAM needs several backward passes per update.
"""

from __future__ import annotations

import contextlib
import time

import torch

from gram_scale.encoder.dropout import row_keys
from gram_scale.encoder.model import ContentEncoder
from gram_scale.exchange import Comm, OwnedVectors, Piece, in_order, owned, pieces
from gram_scale.nonfinite import finite_norm

# token counters of the encoder's work: real tokens and padded tokens (rows x the call's longest
# text, what the encoder computes), forward (every call, recomputes included) and backward; and
# the query-key pairs each attention layer computes (rows x the call's longest text squared)
TOKEN_COUNTERS = (
    "tokens_forward",
    "padded_forward",
    "tokens_backward",
    "padded_backward",
    "attention_pairs_forward",
    "attention_pairs_backward",
)


class SavedActivations:
    """Bytes of what autograd keeps for a backward, as a ``saved_tensors_hooks`` pack hook counts
    them: each distinct storage once (a tensor saved by several operations, or views of one
    tensor, are one allocation), and no parameter nor view of one (a layer's weight, saved for
    its backward, is memory the model holds anyway; under ZeRO-3 it is a gathered copy that
    DeepSpeed frees after the layer and gathers again for the backward, not memory the graph
    keeps). What remains are the tensors alive until the backward because the graph holds them:
    activations, and bf16 copies of weights that autocast made for the graph."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):
            return t
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass)
            key, size = id(t), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size
        return t

    def hooks(self):
        """The context that counts what the graphs built inside it save."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class EncoderClock:
    """Seconds the encoder's training calls take, forward and backward (the optimizer step not
    included): the calls the token counters count. On CPU the wall clock around each call. On
    CUDA two events on the current stream around it, read when taken (once a step, after the
    step has waited for its work), so timing adds no synchronisation: the GPU time from the
    call's first kernel to its last, gaps between launches included, work before the call not.
    (Work a DeepSpeed backward leaves on its own streams past the call's end is not counted.)"""

    SETTLE_EVERY = 1024  # calls whose events are read at once when nothing takes them

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0  # settled, not yet taken
        self._pending: list[tuple] = []  # CUDA (start, end) events not yet read

    @contextlib.contextmanager
    def __call__(self):
        if not self.cuda:
            t = time.perf_counter()
            try:
                yield
            finally:
                self.seconds += time.perf_counter() - t
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((start, end))
            if len(self._pending) >= self.SETTLE_EVERY:
                self._settle()

    def _settle(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3  # milliseconds
        self._pending.clear()

    def take(self) -> float:
        """Seconds since the last call."""
        self._settle()
        out, self.seconds = self.seconds, 0.0
        return out


class FrozenCache:
    """Eval-mode vectors of a frozen encoder's items, filled on first use: its weights never
    change, so each item is encoded once per run."""

    def __init__(self, n_items: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.slot = torch.full((n_items,), -1, dtype=torch.long)  # row of each item, -1: none
        self.vectors = torch.zeros(0, dim, dtype=dtype, device=device)

    def missing(self, items: torch.Tensor) -> torch.Tensor:
        """The distinct items not yet held (sorted)."""
        u = torch.unique(items.cpu())
        return u[self.slot[u] < 0]

    def add(self, items: torch.Tensor, vectors: torch.Tensor) -> None:
        """Hold the vectors of new items."""
        self.slot[items] = torch.arange(len(items)) + len(self.vectors)
        self.vectors = torch.cat([self.vectors, vectors.detach()])

    def get(self, items: torch.Tensor) -> torch.Tensor:
        """The held vectors of ``items`` (every one held), in their order."""
        return self.vectors[self.slot[items.cpu()].to(self.vectors.device)]

    def __len__(self) -> int:
        return len(self.vectors)


class EncoderRunner:
    """Encodes item rows, back-propagates item gradients through the encoder, steps it."""

    def __init__(
        self,
        encoder: ContentEncoder,
        tokens,
        comm: Comm,
        opts,
        engine=None,
        optimizer=None,
        scheduler=None,
    ):
        self.encoder = encoder  # the plain module (inside the engine when there is one)
        self.engine = engine  # DeepSpeed engine, or None
        self.optimizer = optimizer
        self.scheduler = scheduler  # torch back end only: an engine steps its own
        self.max_grad_norm = opts.max_grad_norm
        self.tokens = tokens
        self.comm = comm
        self.device = comm.device
        self.chunk = opts.encoder_batch_size
        self.max_tokens = opts.encoder_tokens  # padded tokens a call (and a kept graph) may hold
        self.chunk_order = opts.chunk_order  # "length": sorted before cutting; "given": not
        self.keyed = opts.keyed_dropout
        self.seed = opts.seed
        self.trainable = not opts.freeze_encoder
        self.dtype = opts.vector_dtype()  # of the vectors handed to the CF model
        # bf16 without DeepSpeed: float32 weights, the encoder's matrix products in bf16
        self.autocast = opts.precision == "bf16" and engine is None
        self.item_forwards = 0  # every row encoded for training, a second pass's included
        self.item_backwards = 0
        self.item_recomputes = 0  # of those, rows encoded a second time, with gradient
        self.token_counts = dict.fromkeys(TOKEN_COUNTERS, 0)
        self.clock = EncoderClock(self.device)  # forward and backward time of those calls
        self._tokens_taken = dict.fromkeys(TOKEN_COUNTERS, 0)
        self.frozen = (
            None
            if self.trainable
            else FrozenCache(len(tokens.lengths), encoder.dim, self.dtype, self.device)
        )
        self._pending_backward = False
        # most encoder graph kept for backwards: activations alive until then (SavedActivations)
        self.peak_activation_bytes = 0
        self._alive = 0  # bytes of the graphs encoded with gradient and not yet back-propagated

    @property
    def lockstep(self) -> bool:
        """Whether every rank must make the same encoder calls, empty ones too: under ZeRO-3 on
        several ranks each call gathers the sharded parameters collectively."""
        return (
            self.engine is not None
            and self.comm.world > 1
            and self.engine.zero_optimization_stage() == 3
        )

    @property
    def module(self):
        return self.engine if self.engine is not None else self.encoder

    def lr(self) -> float | None:
        """The learning rate of the next encoder step (None for a frozen encoder)."""
        if not self.trainable:
            return None
        opt = self.engine.basic_optimizer if self.engine is not None else self.optimizer
        return float(opt.param_groups[0]["lr"])

    def numerics(self) -> dict:
        """dtypes of the encoder's weights, matrix products and gradient accumulation, and its
        attention kernel: what the run really did, for metrics.json."""
        weights = next(self.encoder.parameters()).dtype
        accum = self.engine.get_data_types()[1] if self.engine is not None else weights
        name = lambda t: str(t).removeprefix("torch.")  # noqa: E731
        return {
            "weights": name(weights),
            "compute": name(torch.bfloat16 if self.autocast else weights),
            "grad_accum": name(accum),
            "attention": getattr(self.encoder.model.config, "_attn_implementation", None),
            "built_partitioned": getattr(self.encoder, "built_partitioned", False),
            "read_by_module": getattr(self.encoder, "read_by_module", False),
        }

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _keys(self, items: torch.Tensor, salt: int | None):
        if salt is None or not self.keyed:
            return None
        return row_keys(items, self.seed * 1_000_003 + salt)

    def encode(
        self, items: torch.Tensor, salt: int | None, grad: bool, count: int | None = None
    ) -> torch.Tensor:
        """Vectors of ``items`` in one forward call; train mode (keyed dropout by ``salt``);
        ``count`` overrides the rows counted (0 for a padding call)."""
        self.module.train()
        saved = SavedActivations()
        with self.clock():
            ids, mask = self.tokens.rows(items)
            ids, mask = ids.to(self.device), mask.to(self.device)
            keys = self._keys(items, salt)
            with torch.set_grad_enabled(grad and self.trainable), self._autocast():
                with saved.hooks():
                    out = (
                        self.module(ids, mask, keys=keys)
                        if keys is not None
                        else self.module(ids, mask)
                    )
        if grad and self.trainable:  # graphs kept together (Single-step's one pass, E2E) add up
            self._alive += saved.bytes
            self.peak_activation_bytes = max(self.peak_activation_bytes, self._alive)
        self._count_tokens("forward", items, count)
        self.item_forwards += len(items) if count is None else count
        return out.to(self.dtype)

    def _count_tokens(self, way: str, items: torch.Tensor | None, count: int | None) -> None:
        if items is None:
            return
        rows = items[: len(items) if count is None else count]
        real, padded = self.tokens.padded_tokens(rows)
        self.token_counts["tokens_" + way] += real
        self.token_counts["padded_" + way] += padded
        self.token_counts["attention_pairs_" + way] += self.tokens.attention_pairs(rows)

    def flops_shape(self) -> dict:
        """What the encoder's model FLOPs are computed from: ``params``, its weights outside the
        embedding tables (each does a multiply-add per token; an embedding is a lookup), and
        the ``layers`` and ``hidden`` width of its attention (None where the config lacks them)."""
        embedded = set()
        for module in self.encoder.modules():
            if isinstance(module, torch.nn.Embedding):
                embedded |= {id(p) for p in module.parameters()}
        # under ZeRO-3 a parameter holds a shard; ds_numel is its full size
        params = sum(
            getattr(p, "ds_numel", p.numel())
            for p in self.encoder.parameters()
            if id(p) not in embedded
        )
        config = getattr(self.encoder.model, "config", None)
        return {
            "params": params,
            "layers": getattr(config, "num_hidden_layers", None),
            "hidden": getattr(config, "hidden_size", None),
        }

    def take_tokens(self) -> list[int]:
        """This rank's token counters (``TOKEN_COUNTERS`` order) since the last call."""
        out = [self.token_counts[k] - self._tokens_taken[k] for k in TOKEN_COUNTERS]
        self._tokens_taken = dict(self.token_counts)
        return out

    def cut(self, items: torch.Tensor) -> list[torch.Tensor]:
        """This rank's chunks of ``items`` by the chunk rule (positions into ``items``); local,
        no collective."""
        return self.tokens.cut(items, self.chunk, self.max_tokens, self.chunk_order)

    def calls(self, items: torch.Tensor, cuts: list[torch.Tensor] | None = None) -> list[Piece]:
        """The encoder calls over this rank's ``items`` by the chunk rule (or ``cuts``), padded
        so that every rank makes as many (one scalar collective)."""
        return pieces(self.comm, items, self.cut(items) if cuts is None else cuts)

    def graph_tokens(self, cuts: list[torch.Tensor], items: torch.Tensor) -> int:
        """Padded tokens of the calls ``cuts`` makes over ``items``: what keeping all their
        graphs at once holds, against ``--encoder-tokens``."""
        return sum(self.tokens.padded_tokens(items[pos])[1] for pos in cuts)

    def vectors(self, items: torch.Tensor, salt: int | None) -> torch.Tensor:
        """Vectors (no gradient) of this rank's ``items`` in their order, encoded in chunks;
        every rank calls it together. A frozen encoder's come from the run's cache: an item is
        encoded once per run, in eval mode (no dropout, so the frozen baseline is
        deterministic), and counted then."""
        if self.frozen is not None:
            self._fill_frozen(items, counted=True)
            return self.frozen.get(items)
        calls = self.calls(items)
        outs = [self.encode(c.items, salt, grad=False, count=c.real) for c in calls]
        return in_order(calls, outs, len(items)) if calls else self.empty()

    def empty(self) -> torch.Tensor:
        """No vectors: a ``[0, dim]`` tensor of the vectors' dtype and device."""
        return torch.zeros(0, self.encoder.dim, dtype=self.dtype, device=self.device)

    def _fill_frozen(self, items: torch.Tensor, counted: bool) -> None:
        """Encode (eval mode) the ``items`` the frozen cache lacks; every rank calls it."""
        new = self.frozen.missing(items)
        with self.clock() if counted else contextlib.nullcontext():
            calls, vecs = self._eval_vectors(new)
        if counted:
            for c in calls:
                self._count_tokens("forward", c.items, c.real)
                self.item_forwards += c.real
        self.frozen.add(new, vecs)

    @torch.no_grad()
    def _eval_vectors(self, items: torch.Tensor) -> tuple[list[Piece], torch.Tensor]:
        """The calls over this rank's ``items`` and their eval-mode vectors (no dropout) in the
        items' order; every rank calls it together."""
        calls = self.calls(items)
        self.module.eval()
        outs = []
        for c in calls:
            ids, mask = self.tokens.rows(c.items)
            with self._autocast():
                outs.append(self.module(ids.to(self.device), mask.to(self.device)).to(self.dtype))
        self.module.train()
        return calls, (in_order(calls, outs, len(items)) if calls else self.empty())

    def drop_graphs(self) -> None:
        """The graphs encoded with gradient are dropped without a backward (a skipped step)."""
        self._alive = 0

    def rng_state(self) -> tuple:
        """The RNG state an encoder call starts from, for ``recompute``."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def recompute(self, items: torch.Tensor, salt: int, state: tuple, count: int) -> torch.Tensor:
        """``encode`` again, with gradient, rows already encoded (and counted) without, from the
        RNG state that call started from: keyed dropout draws the same masks anyway, and with
        ``--no-keyed-dropout`` the global RNG then does too, so the vectors are the ones the CF
        model saw. The RNG stream outside goes on as if there had been no second call."""
        self.item_recomputes += count
        cpu, cuda = state
        devices = [self.device] if cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            return self.encode(items, salt, grad=True, count=count)

    def backward(
        self,
        vectors: torch.Tensor,
        grads: torch.Tensor,
        last: bool = True,
        count: int | None = None,
        items: torch.Tensor | None = None,
    ) -> None:
        """Back-propagate ``sum(vectors * grads)``: each row gets exactly its item gradient.

        ``last=False`` keeps a DeepSpeed engine from treating this backward as the end of the
        accumulation (ZeRO would otherwise reduce and drop the partial gradients early);
        ``count`` overrides the rows counted (0 for a padding call); ``items``, the call's
        rows, counts its tokens."""
        if not self.trainable:
            return
        surrogate = (vectors * grads.to(vectors.device, vectors.dtype)).sum()
        self._count_tokens("backward", items, count)
        self._alive = 0  # the graphs encoded so far are being released
        self.item_backwards += len(vectors) if count is None else count
        with self.clock():
            if self.engine is not None:
                # The engine averages gradients over ranks; ours are partial sums: scale back up.
                self.engine.set_gradient_accumulation_boundary(last)
                self.engine.backward(surrogate * self.comm.world)
            else:
                surrogate.backward()
        self._pending_backward = True

    def backward_kept(
        self, calls: list[Piece], outs: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """Back-propagate the graphs of several calls kept together (each call's rows with its
        gradients) in one backward, the end of the accumulation: ZeRO-3 gathers and releases
        parameters by module hooks that expect one backward after the forwards it covers."""
        if not self.trainable or not calls:
            return
        for c in calls:
            self._count_tokens("backward", c.items, c.real)
        self.backward(torch.cat(outs), torch.cat(grads), count=sum(c.real for c in calls))

    def _groups(self) -> list[dict]:
        opt = self.engine.basic_optimizer if self.engine is not None else self.optimizer
        return opt.param_groups

    def step(self, lr_scale: float = 1.0) -> bool:
        """One optimizer step from the gradients back-propagated since the last step, at
        ``lr_scale`` times the scheduled rate (the schedule itself is not changed). False when
        the gradient is not finite (on any rank): the update is dropped with its gradients."""
        if not self.trainable or not self._pending_backward:
            return True
        if lr_scale == 1.0:
            return self._step()
        rates = [g["lr"] for g in self._groups()]
        for g, lr in zip(self._groups(), rates):
            g["lr"] = lr * lr_scale
        try:
            return self._step()
        finally:  # a scheduler has set the next step's rate by now; without one, restore it
            for g, lr in zip(self._groups(), rates):
                if g["lr"] == lr * lr_scale:
                    g["lr"] = lr

    def _step(self) -> bool:
        self._pending_backward = False
        if self.engine is not None:
            # ZeRO takes the global gradient norm before it steps and skips (counting it) a step
            # whose norm is not finite, the scheduler included; it also clips here.
            skipped = self.engine.skipped_steps
            self.engine.step()
            return self.engine.skipped_steps == skipped
        params = [p for p in self.encoder.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        self.comm.all_reduce_(grads)
        # The finite check is the global norm's (gram_scale.nonfinite). One norm per tensor
        # costs a tenth of an element-wise check of every gradient (MiniLM on CPU: 6 ms against
        # 60 ms a step).
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not finite_norm(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        # Here, once: the update's gradient has arrived through several backward calls. (Both
        # halves of clip_grad_norm_, the norm taken once.)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def owned_vectors(self, n_items: int) -> OwnedVectors:
        """Eval-mode vectors (no dropout) of the catalogue items this rank owns, in chunks by
        the chunk rule (a frozen encoder's from its cache, filled with the items it lacks);
        every rank makes the same number of calls."""
        mine = owned(self.comm, torch.arange(n_items))
        if self.frozen is not None:
            self._fill_frozen(mine, counted=False)  # evaluation is not training work
            return OwnedVectors(self.comm, mine, self.frozen.get(mine))
        return OwnedVectors(self.comm, mine, self._eval_vectors(mine)[1])
