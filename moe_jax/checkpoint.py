"""Orbax checkpoints of a training run: train state, data iterator position, loop state, config.

Orbax writes a checkpoint into a temporary directory and renames it when every file is
written, so a process killed while saving leaves the previous checkpoint as the newest
complete one; the leftover temporary directory is removed when the manager opens again.
"""

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The workdir's checkpoint was made by a model of another shape, or cannot be read."""


class Checkpointer:

  def __init__(self, directory: Path, keep: int, read_only: bool = False):
    """`read_only` opens another process's checkpoints (analysis) without touching them: no
    directory made, no partial checkpoint of a run still saving removed."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, loop_state: dict, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state),
        config=ocp.args.JsonSave(config)))

  def check_model(self, step: int, model_config: dict) -> None:
    """Raises CheckpointMismatch naming each model setting that differs from the checkpoint's."""
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved_model = saved["config"].get("model", {})
    differing = sorted(k for k in set(model_config) | set(saved_model)
                       if saved_model.get(k) != model_config.get(k))
    if differing:
      details = ", ".join(f"model.{k}: {saved_model.get(k)!r} in the checkpoint, "
                          f"{model_config.get(k)!r} now" for k in differing)
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.manager.directory} was made with other model "
          f"settings ({details}); use a new --workdir or the checkpoint's settings")

  def restore(self, step: int, abstract_state):
    """(state, data iterator state, loop state) at `step`; the state laid out like
    `abstract_state` (ShapeDtypeStructs with shardings)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          loop=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.manager.directory} cannot be read "
          f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); move it away to resume "
          f"from an older one, or use a new --workdir") from None
    return restored["state"], restored["data"], restored["loop"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
