"""Orbax checkpoints of a training run: train state, data iterator position, loop state, config,
and the checksums that let a restore prove it read back what was saved.

Orbax writes a checkpoint into a temporary directory and renames it when every file is
written, so a process killed while saving leaves the previous checkpoint as the newest
complete one; the leftover temporary directory is removed when the manager opens again.

Nothing read from disk is trusted: each checkpoint carries an `integrity` item with a checksum
of every array (computed on device from the state being saved: two wrapping uint32 sums of
its bit patterns, plain and position-weighted, so any flipped bit or moved value shows) and a
SHA-256 of each JSON item. A restore recomputes them and raises `CheckpointCorrupt`, naming
the step and what differs, for a flipped bit, a truncated or missing file, or an edited item.

Saves run in orbax's background thread; `save_failure()` reports one that failed (a full
disk) without waiting, so the loop stops at the next step instead of training on unsaved.
"""

import contextlib
import functools
import hashlib
import json
import logging as std_logging
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

INTEGRITY_FORMAT = 1


class CheckpointMismatch(ValueError):
  """The workdir's checkpoint was made by a model (or optimizer state) of another shape, or
  cannot be read."""


class CheckpointCorrupt(CheckpointMismatch):
  """The checkpoint at `step` does not read back as it was saved."""

  def __init__(self, step: int, directory: Path, what: str):
    super().__init__(
        f"the checkpoint at step {step} in {directory} is corrupt: {what}. Resume from the "
        f"newest checkpoint that verifies with --skip_corrupt_checkpoints (it moves this one to "
        f"{Path(directory).parent / 'corrupt_checkpoints'}), or use a new --workdir")
    self.step = step


class CheckpointSaveFailed(RuntimeError):
  """Saving the checkpoint at `step` failed in the background (a full disk, a lost mount)."""

  def __init__(self, step: int, error: BaseException, kept: int | None, directory: Path,
               stopped_after: int | None = None):
    kept_text = (f"the checkpoint at step {kept} is the newest complete one and is intact"
                 if kept else "no complete checkpoint exists yet")
    stopped = f" after step {stopped_after}" if stopped_after else ""
    super().__init__(
        f"saving the checkpoint at step {step} in {directory} failed ({_one_line(error)}); "
        f"training stopped{stopped}: {kept_text}. Free space or fix the disk, then run the "
        f"same command again to resume")
    self.step, self.error, self.kept, self.directory = step, error, kept, directory

  def stopped_after(self, step: int) -> "CheckpointSaveFailed":
    """The same failure, saying at which step training stopped."""
    return CheckpointSaveFailed(self.step, self.error, self.kept, self.directory, step)


def _one_line(error: BaseException) -> str:
  """`Type: first line` of the innermost cause (orbax wraps tensorstore's precise message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  lines = str(text).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _raised_in_orbax(error: BaseException | None) -> bool:
  """Whether `error` (or what it was raised from) passed through orbax's code."""
  while error is not None:
    traceback = error.__traceback__
    while traceback is not None:
      if "orbax" in traceback.tb_frame.f_code.co_filename:
        return True
      traceback = traceback.tb_next
    error = error.__cause__ or error.__context__
  return False


class _OrbaxErrorsReportedByUs(std_logging.Filter):
  """Orbax logs a failed save or restore with its traceback (from its own threads, when it
  happens) before raising it to the caller, and asyncio logs the same failure again for each
  of orbax's and tensorstore's reads whose result nobody collected (this package runs no
  asyncio code of its own); every such failure reaches the user as one line from this module
  (CheckpointCorrupt, CheckpointSaveFailed), so those records are dropped."""

  def filter(self, record) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not ("orbax" in record.pathname or "orbax" in str(record.msg)
                or "exception was never retrieved" in str(record.msg)
                or _raised_in_orbax(error))


for _logger in ("absl", "asyncio"):   # asyncio: orbax's abandoned tasks, when collected
  std_logging.getLogger(_logger).addFilter(_OrbaxErrorsReportedByUs())


def _ignore_closed_loop_callbacks(default_hook=sys.unraisablehook):
  """When a save or restore fails, orbax closes its event loop while the operation's other
  reads or writes still run; as each ends, tensorstore's callback finds the loop closed, and
  the abandoned reads are collected with their errors; Python prints each as an unraisable
  error with a traceback (several per failure, some before the failure is seen). The failure
  itself reaches the user as one line from here."""

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    from_orbax = (code is not None and "orbax" in code.co_filename) or _raised_in_orbax(
        unraisable.exc_value)
    if not (from_orbax or "Event loop is closed" in str(unraisable.exc_value)):
      default_hook(unraisable)

  return hook


sys.unraisablehook = _ignore_closed_loop_callbacks()


# ---------------------------------------------------------------------------------------------
# Checksums


def _words_u32(x):
  """The bit patterns of `x`'s elements as uint32 (16- and 8-bit types widened)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x):
  """[sum of words, sum of words x (flat position + 1)], both modulo 2^32: integer sums, so
  the result does not depend on how the array is sharded or on the order of reduction."""
  words = _words_u32(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  for axis in range(words.ndim):
    stride = np.uint32(math.prod(words.shape[axis + 1:]) % 2**32)
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * stride
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (position + np.uint32(1)), dtype=jnp.uint32)])


@jax.jit
def _checksums(state):
  return jax.tree.map(_leaf_checksum, state)


def array_checksums(state) -> dict[str, list[int]]:
  """{array path: [two uint32 checksums]} of every array of `state`, computed where it lives."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(leaf)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}


def json_checksum(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def check_loop_state(loop_state) -> str | None:
  """What is wrong with a restored loop item, if anything."""
  recent = loop_state.get("guard", {}).get("recent") if isinstance(loop_state, dict) else None
  if not isinstance(recent, list) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in recent):
    return "its loop item has no list of finite recent losses"
  return None


def check_data_state(data_state, step: int) -> str | None:
  """What is wrong with a restored data-iterator item (grain's {"next_index": batches drawn}):
  a run at `step` has drawn at least `step` batches (more after a rollback skipped some)."""
  index = data_state.get("next_index") if isinstance(data_state, dict) else None
  if not isinstance(index, int) or isinstance(index, bool) or index < step:
    return f"its data item says {data_state!r}, but step {step} needs next_index >= {step}"
  return None


# ---------------------------------------------------------------------------------------------
# The manager


@functools.cache
def _save_each_array_from_one_replica_on_cpu() -> None:
  """Orbax splits the saving of a replicated array among its replicas, on every backend but
  GPU, slicing each array on its devices: on CPU devices, which share the host's memory, that
  saves nothing and compiles one slicing program per array shape and device, seconds for the
  first save of a run (3.6 s against 0.2 s for 60 small arrays replicated on 8 devices). As
  orbax does for GPU, one replica writes each array there. (Orbax's handler for jax arrays is
  registered once per process; this replaces it, once, only where the devices are CPUs.)"""
  if jax.default_backend() != "cpu":
    return
  absl = std_logging.getLogger("absl")   # orbax warns of the override: expected, so quiet
  level = absl.level
  absl.setLevel(std_logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl.setLevel(level)


class Checkpointer:

  def __init__(self, directory: Path, keep: int, read_only: bool = False):
    """`read_only` opens another process's checkpoints (analysis) without touching them: no
    directory made, no partial checkpoint of a run still saving removed."""
    _save_each_array_from_one_replica_on_cpu()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           read_only=read_only)
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.saving: int | None = None      # the step whose background save is not yet confirmed

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def kept_steps(self) -> list[int]:
    """The steps of the complete checkpoints kept, oldest first."""
    return sorted(self.manager.all_steps())

  def older_step(self, step: int) -> int | None:
    """The newest complete checkpoint before `step`."""
    return max((s for s in self.manager.all_steps() if s < step), default=None)

  def save(self, step: int, state, data_state: dict, loop_state: dict, config: dict) -> None:
    """Starts saving in the background; a previous save's failure is raised first."""
    self.wait()
    integrity = {"format": INTEGRITY_FORMAT, "arrays": array_checksums(state),
                 "data": json_checksum(data_state), "loop": json_checksum(loop_state),
                 "config": json_checksum(config)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state),
        config=ocp.args.JsonSave(config),
        integrity=ocp.args.JsonSave(integrity)))
    self.saving = step

  def save_failure(self, wait: bool = False) -> "CheckpointSaveFailed | None":
    """The failure of the last background save, once it has ended (with `wait`, after
    waiting for it); None while it runs or when it succeeded. Costs nothing while it runs."""
    if self.saving is None or (not wait and self.manager.is_saving_in_progress()):
      return None
    step, self.saving = self.saving, None
    try:
      self.manager.wait_until_finished()
    except BaseException as error:   # whatever the writer raised: the save did not happen
      return CheckpointSaveFailed(step, error, self.older_step(step), self.directory)
    return None

  def saved_config(self, step: int) -> dict:
    """The config saved with the checkpoint at `step` (its integrity checked)."""
    items = self._restore_items(step, config=ocp.args.JsonRestore(),
                                integrity=ocp.args.JsonRestore())
    self._check_json(step, items, "config")
    return items["config"]

  def check_model(self, step: int, settings: dict, defaults: dict) -> None:
    """Raises CheckpointMismatch naming each of the `settings` ("section.field": value: those
    that shape the model's state and the optimizer's) that differs from the checkpoint's; a
    setting its config lacks (written before the field existed) takes its value from
    `defaults`."""
    saved_config = self.saved_config(step)
    saved = {name: saved_config.get(name.split(".")[0], {}).get(name.split(".")[1], defaults[name])
             for name in settings}
    differing = sorted(k for k in settings if saved[k] != settings[k])
    if differing:
      details = ", ".join(f"{k}: {saved[k]!r} in the checkpoint, {settings[k]!r} now"
                          for k in differing)
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.directory} was made by a model or optimizer "
          f"state of another shape ({details}); use a new --workdir or the checkpoint's "
          f"settings")

  def restore(self, step: int, abstract_state):
    """(state, data iterator state, loop state) at `step`, each checked against the
    checkpoint's checksums; the state laid out like `abstract_state` (ShapeDtypeStructs with
    shardings). Raises CheckpointCorrupt when anything does not verify."""
    items = self._restore_items(step, state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore(), loop=ocp.args.JsonRestore(),
                                integrity=ocp.args.JsonRestore())
    for name in ("data", "loop"):
      self._check_json(step, items, name)
    expected, actual = items["integrity"].get("arrays"), array_checksums(items["state"])
    if expected != actual:
      bad = sorted(set(expected or {}) ^ set(actual)) or sorted(
          k for k in actual if expected[k] != actual[k])
      raise CheckpointCorrupt(step, self.directory,
                              f"{len(bad)} array(s) differ from their checksums "
                              f"(state{bad[0]}{', ...' if len(bad) > 1 else ''})")
    saved_step = getattr(items["state"], "step", step)
    problem = (check_data_state(items["data"], step) or check_loop_state(items["loop"])
               or (None if int(saved_step) == step else f"its state is at step {int(saved_step)}"))
    if problem:
      raise CheckpointCorrupt(step, self.directory, problem)
    return items["state"], items["data"], items["loop"]

  def _restore_items(self, step: int, **items) -> dict:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      if not isinstance(restored.get("integrity"), dict) or (
          restored["integrity"].get("format") != INTEGRITY_FORMAT):
        raise ValueError("no integrity item (checksums) of this format")
      return restored
    except CheckpointCorrupt:
      raise
    except Exception as error:   # orbax and tensorstore raise many types for unreadable data
      raise CheckpointCorrupt(step, self.directory,
                              f"it cannot be read ({_one_line(error)})") from None

  def _check_json(self, step: int, items: dict, name: str) -> None:
    if json_checksum(items[name]) != items["integrity"].get(name):
      raise CheckpointCorrupt(step, self.directory,
                              f"its {name} item differs from its checksum (edited or damaged)")

  def set_aside(self, step: int) -> Path:
    """Moves the checkpoint at `step` out of the way, to <workdir>/corrupt_checkpoints/."""
    target = self.directory.parent / "corrupt_checkpoints" / str(step)
    target.parent.mkdir(exist_ok=True)
    if target.exists():
      shutil.rmtree(target)
    shutil.move(str(self.directory / str(step)), target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    """Waits for the last background save; raises CheckpointSaveFailed if it failed."""
    failure = self.save_failure(wait=True)
    if failure:
      raise failure

  def close(self) -> None:
    """Closes the manager, waiting for a save in flight; a failure was reported already, or
    the run is ending on another error."""
    with contextlib.suppress(Exception):
      self.manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
