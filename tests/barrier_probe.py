"""Launched on 2 CPU processes by tests/test_barriers.py: the Accelerator the trainer builds
(``engine.make_accelerator``) must make its barriers wait. Rank 1 arrives late at each barrier;
rank 0 prints how long it waited (``waited SECONDS``), once per barrier kind."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram_scale.engine import make_accelerator  # noqa: E402

LATE = 1.5


def main(config: str) -> None:
    opts = SimpleNamespace(dist_timeout=60, report_to="none", output_dir=None, precision="fp32")
    ds_raw = (
        None
        if config == "none"
        else {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    )
    accelerator = make_accelerator(opts, ds_raw)
    late = accelerator.process_index == 1
    t = time.perf_counter()
    if late:
        time.sleep(LATE)
    accelerator.wait_for_everyone()
    waited_barrier = time.perf_counter() - t
    t = time.perf_counter()
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            time.sleep(LATE)  # the others enter only after this
    waited_first = time.perf_counter() - t
    print(
        f"rank {accelerator.process_index} {accelerator.distributed_type} "
        f"barrier {waited_barrier:.2f} first {waited_first:.2f}",
        flush=True,
    )
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
