"""Host memory of DeepSpeed runs that gather weights in CPU memory: freed tensors go back to
the system.

glibc serves an allocation below its mmap threshold from a heap arena, and raises that
threshold (up to 32 MiB) each time a larger mapped block is freed. Under ZeRO-3 on CPU memory
every layer's gathered weights (a few MiB to tens of MiB each), communication buffers and
gradient buckets are allocated and freed again at every step, from several threads: after the
first frees they land in arenas, which fragment and keep the freed memory resident. On the 1B
benchmark (``python -m gram_scale.bench --workload llm-1b``) that was about 2 GB per rank of
resident memory that no tensor used. A fixed threshold of 1 MiB gives every larger tensor its
own mapping, returned to the system when it is freed (and turns the raising off).
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 1 << 20


def gathers_in_host_memory(ds_raw: dict | None, cuda: bool) -> bool:
    """Whether a run's DeepSpeed config gathers and frees weights in host memory at every step:
    ZeRO-3 on CPUs (no GPU), or parameters or optimizer offloaded to the CPU. Not ZeRO-1/2
    on CPUs: their weights stay put, and a fixed threshold would only cost page faults (the
    built-in default job under ZeRO-2 on 2 CPU cores trained 22% slower with it: 80 s against
    66 s, three times the system time)."""
    if ds_raw is None:
        return False
    zero = ds_raw.get("zero_optimization", {})
    if not cuda and str(zero.get("stage", 0)) == "3":
        return True
    return any(
        str(zero.get(key, {}).get("device", "none")).lower() == "cpu"
        for key in ("offload_param", "offload_optimizer")
    )


def map_large_allocations(threshold: int = THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more from their own mappings from now on
    (glibc ``mallopt(M_MMAP_THRESHOLD)``); False where not applied: not glibc, or the user set
    ``MALLOC_MMAP_THRESHOLD_`` (glibc read it at start, and it wins)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
