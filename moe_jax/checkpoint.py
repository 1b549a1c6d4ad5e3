"""Orbax checkpoints of a training run: train state, data iterator position and config.

A checkpoint is written atomically by orbax (a temporary directory renamed when complete), so a
crash while saving leaves the previous checkpoint as the newest complete one.
"""

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The workdir's checkpoint was made by a model of another shape."""


class Checkpointer:

  def __init__(self, directory: Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, step: int, like_state, model_config: dict):
    """The state at `step` laid out like `like_state`, and the data iterator's position."""
    saved_config = self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if saved_config.get("model") != model_config:
      differing = sorted(k for k in model_config
                         if saved_config.get("model", {}).get(k) != model_config[k])
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.manager.directory} was made with other model "
          f"settings ({', '.join(f'model.{k}' for k in differing)}); use a new --workdir or the "
          f"checkpoint's settings")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
