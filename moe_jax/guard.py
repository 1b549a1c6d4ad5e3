"""The loss guard: decides when a training step's numbers are bad enough to roll back.

A step is bad when its loss or gradient norm is not finite, or when its loss exceeds
`spike_factor` times the mean loss of the last `window` good steps (a spike). The loop then
restores the last good checkpoint and goes on with the batches after the bad one, so the
batches from the checkpoint to the bad step are skipped. `max_rollbacks` rollbacks in a row
(with no checkpoint saved in between) mean the run cannot make progress: it stops with
`TrainingDiverged`. Host-side Python only, so every rule is unit-tested directly.
"""

import collections
import math


class TrainingDiverged(RuntimeError):
  """Too many rollbacks in a row: the run stops, its last good checkpoint kept."""


class LossGuard:

  def __init__(self, spike_factor: float, window: int, max_rollbacks: int):
    self.spike_factor = spike_factor
    self.max_rollbacks = max_rollbacks
    self.recent = collections.deque(maxlen=window)
    self.rollbacks_in_a_row = 0

  def problem(self, loss: float, grad_norm: float) -> str | None:
    """Why this step's numbers are bad, or None when they are fine."""
    if not math.isfinite(loss):
      return f"non-finite loss ({loss})"
    if not math.isfinite(grad_norm):
      return f"non-finite gradient norm ({grad_norm})"
    if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
      mean = sum(self.recent) / len(self.recent)
      if loss > self.spike_factor * mean:
        return (f"loss spike: {loss:.4f} > {self.spike_factor:g} x {mean:.4f} (mean of the last "
                f"{len(self.recent)} steps)")
    return None

  def accept(self, loss: float) -> None:
    """Adds a good step's loss to the running window."""
    self.recent.append(loss)

  def rolled_back(self, reason: str) -> None:
    """Counts a rollback; raises TrainingDiverged when there have been too many in a row."""
    self.rollbacks_in_a_row += 1
    if self.rollbacks_in_a_row > self.max_rollbacks:
      raise TrainingDiverged(
          f"training diverged: {self.rollbacks_in_a_row} rollbacks in a row without a new "
          f"checkpoint (train.max_rollbacks={self.max_rollbacks}); the last was for {reason}. "
          f"The newest good checkpoint is kept: lower optimizer.learning_rate, raise "
          f"train.spike_factor, or check the data near this step")

  def checkpointed(self) -> None:
    """A good checkpoint was saved: the count of rollbacks in a row starts again."""
    self.rollbacks_in_a_row = 0

  def state(self) -> dict:
    """What a checkpoint keeps of the guard: the window, so a resumed or rolled-back run
    judges spikes against the same mean as when the checkpoint was saved."""
    return {"recent": list(self.recent)}

  def restore(self, state: dict) -> None:
    """Resets the window to a checkpoint's; the count of rollbacks in a row is kept."""
    self.recent.clear()
    self.recent.extend(state["recent"])
