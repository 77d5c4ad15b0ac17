"""The epoch-time cost model, measured in the benchmark process: what an item costs the encoder
and an interaction the CF model, the speed-ups those predict, and the time a Multi-step step
spends outside both.

With e = encoder forward+backward per item, f = forward only per item, c = CF
forward+backward+step per interaction, N interactions and I distinct items in an epoch:
E2E ~ N(e + c), Single-step ~ (N / R_batch) e + N c, Multi-step 1E ~ I(e + f) + N c, so the 1E
speed-up tends to e / c as R_epoch = N / I grows.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from gram_scale.config import Options


def _plain_setup(opts: Options, **changes):
    """A trainer setup in this process for timing: plain torch (no DeepSpeed engine, no
    tracker), on the accelerator the runs use; ``(setup, device, sync)``, where ``sync`` waits
    for queued accelerator work (a no-op on CPU)."""
    import torch

    from gram_scale.data.load import load_data
    from gram_scale.engine import make_accelerator
    from gram_scale.trainer import setup

    plain = dataclasses.replace(opts, config="none", report_to="none", **changes)
    s = setup(plain, load_data(plain), make_accelerator(plain, None), None)  # GPU when present
    device = s.runner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return s, device, sync


def _timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up: first calls allocate and build caches
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_costs(opts: Options, repeats: int = 3, cf_batches: int = 8) -> dict:
    """e (encoder forward+backward per item), f (forward only) and c (CF per interaction).

    Same code paths as training (keyed dropout, the runner's forward, the task's CF loss and
    AdamW step), on chunks of --encoder-batch-size items and on the epoch's first batches, on
    the accelerator the runs use; plain torch, without the DeepSpeed engine."""
    import itertools

    import torch

    from gram_scale.data.batches import unique_index

    s, device, sync = _plain_setup(opts)
    chunk = torch.arange(min(len(s.data.catalogue), opts.encoder_batch_size))

    def fwd_bwd() -> None:
        h = s.runner.encode(chunk, salt=0, grad=True)
        (h * torch.ones_like(h)).sum().backward()
        s.encoder.zero_grad(set_to_none=True)

    def fwd() -> None:
        s.runner.encode(chunk, salt=0, grad=False)

    e = _timed(fwd_bwd, repeats, sync) / len(chunk)
    f = _timed(fwd, repeats, sync) / len(chunk)
    batches = list(itertools.islice(s.task.train_batches(0), cf_batches + 1))
    g = torch.Generator().manual_seed(0)
    table = 0.1 * torch.randn(len(s.data.catalogue), s.encoder.dim, generator=g).to(device)

    def cf_step(batch) -> None:
        local, index = unique_index(batch.items)
        s.cf.loss_and_item_grads(batch, table[local.to(device)], index)
        s.cf.step()

    cf_step(batches[0])
    per = []
    for batch in batches[1:] or batches:
        sync()
        t = time.perf_counter()
        cf_step(batch)
        sync()
        per.append((time.perf_counter() - t) / max(batch.occurrences(), 1))
    return {
        "e_s": e,
        "f_s": f,
        "c_s": statistics.median(per),
        "chunk": len(chunk),
        "tokens_per_item": s.tokens.mean_tokens(),
    }


def cost_model(costs: dict, stats: dict) -> dict:
    """The epoch-time model: E2E N(e+c), Single (N/R_batch)e + Nc, 1E I(e+f) + Nc."""
    e, f, c = costs["e_s"], costs["f_s"], costs["c_s"]
    n, items, r_batch = stats["occurrences"], stats["distinct_items"], stats["R_batch"]
    e2e = n * (e + c)
    return {
        "bound_e_over_c": e / c,
        "predicted_single_speedup": e2e / (n / r_batch * e + n * c),
        "predicted_1E_speedup": e2e / (items * (e + f) + n * c),
    }


class _Clock:
    """Seconds spent inside the methods it wraps (one instance's methods, not the class's)."""

    def __init__(self, sync) -> None:
        self.seconds = 0.0
        self.sync = sync

    def wrap(self, obj, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            self.sync()  # on an accelerator, work queued before the call is not the call's
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds += time.perf_counter() - t

        setattr(obj, name, timed)


def measure_overhead(opts: Options, window: str = "1E") -> dict:
    """Where one epoch of Multi-step's steps goes: encoder, CF model, and everything else.

    Trains the epoch in this process (plain torch, one process) with the encoder runner's
    encode/backward/step and the CF update's loss-and-gradients/step timed; the rest of each
    step's time is the strategy's own work: unique index, table lookups, inserts and updates, the
    item exchange, the step's scalar collective and the count checks."""
    import torch

    from gram_scale.data.batches import unique_index

    s, device, sync = _plain_setup(opts, strategy="multi", window=window, freeze_encoder=False)
    batches = list(s.task.train_batches(0))
    # warm-up outside the timed epoch: first calls allocate and build caches
    s.runner.encode(torch.arange(min(len(s.data.catalogue), opts.encoder_batch_size)), 0, False)
    rows = torch.zeros(len(s.data.catalogue), s.encoder.dim, dtype=s.runner.dtype, device=device)
    local, index = unique_index(batches[0].items)
    s.cf.loss_and_item_grads(batches[0], rows[local.to(device)], index)
    s.cf.discard()
    encoder, cf = _Clock(sync), _Clock(sync)
    for name in ("encode", "backward", "step"):
        encoder.wrap(s.runner, name)
    for name in ("loss_and_item_grads", "step"):
        cf.wrap(s.cf, name)
    total = 0.0
    for step, batch in enumerate(batches):
        sync()
        t = time.perf_counter()
        s.strategy.step(batch, step)
        sync()
        total += time.perf_counter() - t
    t = time.perf_counter()
    s.strategy.finish(len(batches))  # a last partial window (none when the window is 1E)
    total += time.perf_counter() - t
    n = len(batches)
    other = total - encoder.seconds - cf.seconds
    return {
        "window": window,
        "steps": n,
        "step_s": total / n,
        "encoder_s": encoder.seconds / n,
        "cf_s": cf.seconds / n,
        "other_s": other / n,
        "other_share": other / total,
    }
