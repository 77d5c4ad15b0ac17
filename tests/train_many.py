"""Several training runs, one after another, in the same launched processes: the runs pay the
Python, torch, transformers and DeepSpeed start-up once. ``accelerate launch
tests/train_many.py RUNS`` where RUNS is a JSON list of ``launch/train.py`` argument lists.

Once every rank has finished run I, rank 0 prints ``FINISHED`` for it; a failed run ends the
launch with its exit status (``launching.run_many`` launches the runs after it again)."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FINISHED = "train_many: run {} of {} finished"


def forget_run() -> None:
    """Drop what a finished run left in module-level state, as accelerate's own tests do
    between Accelerators; the process group stays for the next run."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # transformers keeps the last DeepSpeed config: a later from_pretrained would still see ZeRO-3
    unset_hf_deepspeed_config()
    gc.collect()  # the run's DeepSpeed engine, its hooks and its optimizer state


def main(runs: list[list[str]]) -> int:
    """Train each argument list in turn; 0, or the first failed run's exit status."""
    # Accelerator.end_training destroys the process group unless the processes were
    # fork-launched, where accelerate expects further Accelerators on the same group (notebook
    # launcher). So is the next run here: engine._init_process_group finds the group and keeps it.
    os.environ["FORK_LAUNCHED"] = "1"
    import torch.distributed as dist

    from gram_scale.cli import main as train

    environ = dict(os.environ)  # the run sets ACCELERATE_USE_DEEPSPEED and such: not for the next
    for i, args in enumerate(runs, 1):
        code = train(args)
        if code:
            print(
                f"train_many: run {i} of {len(runs)} failed with exit {code}",
                file=sys.stderr,
                flush=True,
            )
            return code
        dist.barrier()  # a rank that failed after the others finished fails this run, not the next
        if dist.get_rank() == 0:
            print(FINISHED.format(i, len(runs)), flush=True)
        os.environ.clear()
        os.environ.update(environ)
        forget_run()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
