"""Host memory of DeepSpeed runs on CPU memory: large freed allocations go back to the system."""

from __future__ import annotations

import subprocess
import sys

from gram_scale.hostmem import gathers_in_host_memory


def test_which_runs_map_large_allocations():
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    on_gpu = {"zero_optimization": {"stage": 3}}
    assert gathers_in_host_memory(offload, cuda=True)
    assert not gathers_in_host_memory(on_gpu, cuda=True)
    assert gathers_in_host_memory(on_gpu, cuda=False)  # ZeRO-3 on CPUs gathers in host memory
    zero2 = {"zero_optimization": {"stage": 2}}
    assert not gathers_in_host_memory(zero2, cuda=False)  # weights stay put: left alone (speed)
    zero2_offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert gathers_in_host_memory(zero2_offload, cuda=False)
    assert not gathers_in_host_memory(None, cuda=False)  # no DeepSpeed: left alone


PROBE = """
import sys, threading
import torch
from gram_scale.hostmem import map_large_allocations

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

applied = map_large_allocations() if sys.argv[1] == "on" else False
x = torch.empty(24 << 20, dtype=torch.uint8).fill_(1)  # mapped; freed, it raises glibc's
del x  # threshold to 24 MiB
before = rss_mib()
kept = []

def work():  # in a thread, as DeepSpeed's and gloo's buffers: 4-8 MiB tensors, freed among
    blocks = []  # small ones still in use
    for i in range(64):
        blocks.append(torch.empty((4 + i % 5) << 20, dtype=torch.uint8).fill_(1))
        kept.append(torch.ones(1000))

t = threading.Thread(target=work)
t.start()
t.join()
print(applied, rss_mib() - before)
"""


def test_freed_tensors_go_back_to_the_system():
    """Without it, 4-8 MiB tensors allocated after glibc raised its threshold come from an
    arena and, freed among small tensors still in use, stay resident (measured: all 382 MiB of
    them); with it each has its own mapping, unmapped when freed."""
    if not sys.platform.startswith("linux"):
        return
    out = {}
    for mode in ("off", "on"):
        r = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        applied, kept = r.stdout.split()
        out[mode] = (applied == "True", int(kept))
    assert out["on"][0]
    assert out["on"][1] < 32 < 128 < out["off"][1], out
