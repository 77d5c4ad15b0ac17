"""The non-finite-step policy, in one place.

- A step whose CF loss, CF gradient or item gradient is not finite on any rank is skipped
  whole: nothing moves. Each rank's verdict (``cf_step_is_bad``) travels in the step's one
  scalar collective, so every rank skips the same steps.
- An encoder gradient that is not finite (``finite_norm`` of its global norm, the same number
  on every rank; a DeepSpeed engine checks its own and counts a skipped step) drops the encoder
  update, and with it that step's CF update (Single-step, E2E) or the window-end mini-batch
  (Multi-step).
- The run counts every skipped step (``BadSteps``) and, after more than ``--max-bad-steps`` in a
  row, stops with a checkpoint of the last good state (exit code 3)."""

from __future__ import annotations

import math

import torch


def finite_norm(norm: torch.Tensor) -> bool:
    """Whether a global gradient norm is finite: a NaN or an infinity in any gradient makes it
    non-finite, so one number checks them all."""
    return bool(torch.isfinite(norm))


def cf_step_is_bad(loss_sum: float, item_grads: torch.Tensor, cf_grads: list) -> bool:
    """This rank's verdict on a step's CF half: the loss, the item rows' gradient or the CF
    model's gradient is not finite."""
    if not math.isfinite(loss_sum) or not bool(torch.isfinite(item_grads).all()):
        return True
    return bool(cf_grads) and not finite_norm(torch.nn.utils.get_total_norm(cf_grads))


class BadSteps:
    """The run's count of skipped steps, kept in ``TrainState`` (``skipped_steps`` and
    ``bad_in_a_row``, so a resume goes on counting)."""

    def __init__(self, state, max_bad_steps: int):
        self.state, self.max_bad_steps = state, max_bad_steps

    def record(self, skipped: bool, encoder_skipped: bool, step: int) -> str | None:
        """Count step ``step``; what to say about it when it was skipped, else None."""
        state = self.state
        if not (skipped or encoder_skipped):
            state.bad_in_a_row = 0
            return None
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        what = "encoder gradient" if encoder_skipped else "loss or gradient"
        dropped = "step" if skipped else "encoder update"
        return f"step {step}: non-finite {what}, {dropped} skipped ({state.bad_in_a_row} in a row)"

    def too_many(self) -> bool:
        """Whether the run must stop: more than --max-bad-steps skipped in a row."""
        return self.state.bad_in_a_row > self.max_bad_steps

    def stop_message(self, step: int, path) -> str:
        """Why the run stopped, and where its last good state is."""
        return (
            f"{self.state.bad_in_a_row} non-finite steps in a row (last: step {step}), more "
            f"than --max-bad-steps {self.max_bad_steps}; the last good state is saved in {path}"
        )
