"""train_and_evaluate(config, workdir): the training loop.

Per run the workdir gets: config.json, data_manifest.json, machine.json, metrics.jsonl, routing.jsonl,
tensorboard/, checkpoints/ (orbax; resumed automatically), and at the end final_metrics.json,
sample.txt and expert_load.png. A step with bad numbers rolls back to the newest checkpoint
(moe_jax.guard); SIGTERM/SIGINT checkpoint and stop at the next step (moe_jax.preemption).
"""

import contextlib
import functools
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from moe_jax import checkpoint, data, parallel, routing, steps, throughput
from moe_jax.checkpoint import CheckpointCorrupt, CheckpointSaveFailed, Checkpointer
from moe_jax.config_validation import (ConfigError, dcn_sizes, pipeline_settings,
                                       resolve_mesh_shape,
                                       validate_config)
from moe_jax.guard import LossGuard
from moe_jax.live import LiveRoutingMetrics
from moe_jax.metrics import MetricWriter, plot_expert_load, summarize_routing
from moe_jax.layers.moe import BalancingBias
from moe_jax.layers.stack import converted_tree
from moe_jax.model import LAYOUT_FIELDS, ModelSpec
from moe_jax.pipeline import training as pipeline_training
from moe_jax.pipeline.training import Pipeline
from moe_jax.preemption import Preempted, StopSignals
from moe_jax.sample import sample_text
from moe_jax.train_settings import TrainSettings
from moe_jax.workdir import WorkdirError, WorkdirLock, check_workdir


def optimizer_from_config(config) -> tuple:
  """(learning-rate schedule, optax optimizer) of a validated config."""
  return steps.OptimizerSettings.from_section(config.optimizer).make(config.train.steps)


def jit_train_step(spec: ModelSpec, graphdef, tx, shardings, microbatches: int = 1,
                   pipeline: Pipeline | None = None):
  """The jitted training step: state, batch and the run's values (`step_arguments_on`) in,
  new state (laid out by `shardings`, the old one donated) and metrics out; each batch in
  `microbatches` slices (through `pipeline`'s stages when given). Runs that differ only in
  their schedule, weight decay, clipping norm, length, MTP weights or balancing values (bias
  rate and freeze step, the auxiliary losses' coefficients) share it."""
  return reused_jit(
      steps.train_step, out_shardings=(shardings, None), donate_argnums=0, graphdef=graphdef,
      tx=tx, bias_update_rule=spec.balancing.bias_update_rule, microbatches=microbatches,
      pipeline=pipeline, replan_every=spec.dispatch.replica_replan_every)


def step_arguments_on(config, mesh) -> tuple:
  """The training step's arguments after the state and the batch, of a validated config, as
  arrays on every device of `mesh` (each process gives its own devices'): the optimizer's
  values (steps.OptimizerValues: the learning-rate schedule's, the weight decay and the
  clipping norm), for a model with MTP modules its loss weights (else None), and the
  balancing values (routing.BalancingValues)."""
  optimizer = steps.OptimizerSettings.from_section(config.optimizer).step_values(
      config.train.steps)
  model = config.model
  mtp = (steps.MTPWeights.for_run(model.mtp_loss_weight, model.mtp_loss_weight_final,
                                  model.mtp_weight_switch_fraction, config.train.steps)
         if model.mtp_depth else None)
  on_mesh = lambda value: replicated_scalar(value, mesh)
  balancing = routing.BalancingValues.of(routing.BalancingSettings.from_section(config.balancing))
  return (steps.OptimizerValues(*(on_mesh(np.float32(v)) for v in optimizer)),
          None if mtp is None else steps.MTPWeights(on_mesh(np.float32(mtp.early)),
                                                    on_mesh(np.float32(mtp.late)),
                                                    on_mesh(np.int32(mtp.switch_step))),
          routing.BalancingValues(*map(on_mesh, balancing)))


def replicated_scalar(value: np.generic, mesh) -> jax.Array:
  """`value` on every device of `mesh` (each process gives its own devices')."""
  return jax.make_array_from_callback((), parallel.replicated(mesh),
                                     lambda _: np.asarray(value))


def seed_argument(seed: int) -> np.uint32:
  """A config's seed as `initial_state` takes it: `jax.random.key` of the result is that of
  `seed` itself (without 64-bit mode jax keeps the seed's low 32 bits)."""
  return np.uint32(seed % 2**32)


def reused_jit(fn, *, out_shardings=None, donate_argnums=(), compiler_options=None,
               **settings):
  """`jax.jit(functools.partial(fn, **settings), ...)`, and the same jitted function again when
  this process asks for the same `fn`, settings and shardings (a resume after
  `stop_after_step`, a notebook's next run, the tests): jax then neither traces nor lowers it
  again, and its executable stays loaded (the persistent compilation cache saves only the
  compile). `fn` itself is part of the key, so a patched or reloaded function gets its own;
  the settings must be hashable values (a model's graphdef, an optimizer from
  `OptimizerSettings.make`, frozen settings). `compiler_options`: XLA's, for this function's
  compiles only."""
  leaves, treedef = jax.tree.flatten(out_shardings)
  return _jitted(fn, tuple(leaves), treedef, donate_argnums,
                 tuple(sorted((compiler_options or {}).items())), tuple(settings.items()))


@functools.lru_cache(maxsize=16)
def _jitted(fn, sharding_leaves, sharding_treedef, donate_argnums, compiler_options, settings):
  return jax.jit(functools.partial(fn, **dict(settings)),
                 out_shardings=jax.tree.unflatten(sharding_treedef, sharding_leaves),
                 donate_argnums=donate_argnums, compiler_options=dict(compiler_options) or None)


def initial_state(seed, *, spec: ModelSpec, tx) -> steps.TrainState:
  """A freshly initialised TrainState (jitted by the loop onto the state's shardings, with
  `initial_state_compiler_options`). The seed (`seed_argument`) is an argument, not a constant
  of the program, so that runs differing only in their seed share one compiled program."""
  return steps.init_state(spec, tx, seed)[1]


def initial_state_compiler_options() -> dict:
  """XLA's options for compiling `initial_state`, which runs once per run: on GPUs without the
  backend's optimisations, which only slow the compile of its random draws (on one H200 the
  `gpu` size's compiled in 19.3 s instead of 32.2 s, every parameter bit for bit the same:
  docs/performance.md). Other backends keep their defaults (on CPU some draws would change in
  their last bits)."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "gpu" else {}


def pipeline_of(config, mesh) -> Pipeline | None:
  """The pipeline a validated config runs on `mesh` (None: no `stage` devices)."""
  if mesh.shape["stage"] == 1:
    return None
  settings = pipeline_settings(config)
  stages = settings.stages(mesh.shape["stage"])
  moe_blocks = config.model.num_layers - config.model.num_dense_layers
  return Pipeline(settings.schedule, settings.block_counts(stages, moe_blocks))


def laid_out_state(config, mesh):
  """(ModelSpec, schedule, optimizer, graphdef, abstract state with its shardings, shardings,
  sharding rules) of a validated config on `mesh`; a rule that does not fit is a ConfigError."""
  spec = ModelSpec.from_config(config)
  schedule, tx = optimizer_from_config(config)
  graphdef, abstract_state = steps.abstract_state(spec, tx, config.seed)
  rules = parallel.parse_rules(config.sharding)
  try:
    shardings = parallel.state_shardings(abstract_state, mesh, rules,
                                         config.optimizer.shard_over_data)
  except parallel.LayoutError as error:
    raise ConfigError(f"invalid config:\n  - {error}") from None
  return (spec, schedule, tx, graphdef, checkpoint.abstract_like(abstract_state, shardings),
          shardings, rules)


MACHINE_FILE = "machine.json"   # where the run (its latest start) ran


def machine() -> dict:
  """The devices, host and software of this run, for tables that compare runs."""
  return {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "backend": jax.default_backend(), "processes": jax.process_count(),
          "cpu_cores": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__}


def evaluate(eval_fn, state, corpus_windows, num_batches, batch_per_process, mesh, batch_axes):
  """Runs the fixed validation batches and returns the summary metrics and per-layer counts."""
  totals = None
  for local in data.evaluation_batches(corpus_windows, num_batches, batch_per_process,
                                       jax.process_index(), jax.process_count()):
    sums = eval_fn(state, parallel.global_batch(local, mesh, batch_axes))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return steps.summarize_evaluation(totals), totals.get("counts")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       stop_after_step: int | None = None,
                       skip_corrupt_checkpoints: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final metrics.

  `stop_after_step` ends this run early (with a checkpoint) as a preemption would; starting
  again on the same workdir continues exactly where it stopped. A checkpoint that does not
  verify is refused, or with `skip_corrupt_checkpoints` set aside for the newest that does.
  """
  validate_config(config, jax.device_count())
  workdir = check_workdir(workdir)
  use_compilation_cache(config.train.get("compilation_cache_dir",
                                         TrainSettings.compilation_cache_dir))
  mesh = mesh_of(config)
  with jax.set_mesh(mesh):   # the context mesh of the expert-parallel shard_maps
    return _train(config, workdir, mesh, stop_after_step, skip_corrupt_checkpoints)


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory` (jax's persistent compilation cache), so that a
  restart, a resume or a sweep's next member with the same programs skips compiling them (on
  one H200, 55 s of a `gpu`-size study member's 255). The JAX_COMPILATION_CACHE_DIR environment
  variable, when set, wins; "" leaves the cache off."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def mesh_of(config):
  """The device mesh a validated config asks for, over every device."""
  sizes = resolve_mesh_shape(dict(config.mesh), jax.device_count())
  return parallel.make_mesh(sizes["data"], sizes["expert"], fsdp=sizes["fsdp"],
                            tensor=sizes["tensor"], stage=sizes["stage"], dcn=dcn_sizes(config))


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one process: `ok`)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _lock(workdir: Path, is_chief: bool) -> WorkdirLock | None:
  """Process 0 locks the workdir for the run; every process refuses when it cannot."""
  lock, problem = None, None
  if is_chief:
    try:
      lock = WorkdirLock(workdir)
    except WorkdirError as error:
      problem = error
  if not _all_agree(problem is None):
    raise problem or WorkdirError(f"--workdir={workdir}: process 0 could not lock it")
  return lock


def restore_in_layout(checkpointer: Checkpointer, step: int, abstract_state):
  """`checkpointer.restore(step, abstract_state)` of a checkpoint whose blocks may be laid out
  the other way (`model.scan_layers`): read in its own layout, then stacked or unstacked into
  `abstract_state`'s, on its shardings."""
  saved = {**ModelSpec.field_defaults(), **checkpointer.saved_config(step).get("model", {})}
  scanned = "blocks" not in abstract_state.params
  if bool(saved["scan_layers"]) == scanned:
    return checkpointer.restore(step, abstract_state)
  layers, dense = saved["num_layers"], saved["num_dense_layers"]
  state, data, loop = checkpointer.restore(
      step, converted_tree(abstract_state, not scanned, layers, dense))
  shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
  return jax.device_put(converted_tree(state, scanned, layers, dense), shardings), data, loop


def checked_settings(spec: ModelSpec, moment_dtype: str) -> dict:
  """The settings a checkpoint must have been made with, by "section.field": those that shape
  the training state (the model's, less the layout that `restore_in_layout` converts, and the
  optimizer moments' dtype)."""
  converted = {f"model.{name}" for name in LAYOUT_FIELDS}
  return {**{k: v for k, v in spec.state_settings().items() if k not in converted},
          "optimizer.moment_dtype": moment_dtype}


def restore_newest_verified(checkpointer: Checkpointer, step: int, abstract_state,
                            settings: dict | None, skip_corrupt: bool, say):
  """(step, restored state) of the newest checkpoint at or before `step` that verifies (0 and
  None: the initial state). A corrupt one raises CheckpointCorrupt, or with `skip_corrupt` is
  moved to corrupt_checkpoints/ and the next older one is tried; the state-shaping
  `settings` (`checked_settings`, when given) must match each checkpoint's."""
  # A field a checkpoint's config lacks takes its default.
  defaults = checked_settings(ModelSpec(), steps.OptimizerSettings().moment_dtype)
  while step:
    try:
      if settings is not None:
        checkpointer.check_model(step, settings, defaults)
      return step, restore_in_layout(checkpointer, step, abstract_state)
    except CheckpointCorrupt as error:
      if not skip_corrupt:
        raise
      older = checkpointer.older_step(step)
      if jax.process_index() == 0:
        moved = checkpointer.set_aside(step)
        say(f"warning: {error.args[0].split('. Resume')[0]}; moved it to {moved} and trying "
            f"{f'the checkpoint at step {older}' if older else 'the initial state'}")
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("set_aside")
        checkpointer.manager.reload()
      step = older or 0
  return 0, None


def _train(config, workdir: Path, mesh, stop_after_step: int | None, skip_corrupt: bool) -> dict:
  is_chief = jax.process_index() == 0
  corpus = data.configured_corpus(config.data, config.model.vocab_size,
                                  workdir / data.TOKENIZER_FILE)
  seq_len, batch_size = config.data.seq_len, config.data.batch_size
  train_windows = data.Windows(corpus.train, seq_len, "train")
  validation_windows = data.Windows(corpus.validation, seq_len, "validation")
  batch_per_process = batch_size // jax.process_count()
  train_data = data.train_dataset(train_windows, batch_per_process, config.data.shuffle_seed,
                                  jax.process_index(), jax.process_count())
  spec, schedule, tx, graphdef, abstract_state, shardings, rules = laid_out_state(config, mesh)

  # Everything that can refuse the run does so before anything is compiled or written: the
  # live metrics port, another run holding the workdir, a checkpoint of another model or one
  # that does not verify. Only then does the workdir receive anything.
  with contextlib.ExitStack() as cleanup:
    port, host = (config.train.metrics_port if is_chief else 0), config.train.metrics_host
    try:
      live = LiveRoutingMetrics(port, host) if port else None
    except OSError as error:
      raise ConfigError(f"invalid config:\n  - train.metrics_port={port}: {host}:{port} cannot "
                        f"be served ({error.strerror or error}); pick a free port and an address "
                        f"of this machine (train.metrics_host), or port 0 for none") from None
    if live:
      cleanup.callback(live.close)
    # Every process looks before any writes (the agreement is a collective), so all take the
    # same path and meet at the same collectives. A new workdir has nothing left to refuse.
    if not _all_agree(workdir.is_dir()):
      try:
        workdir.mkdir(parents=True, exist_ok=True)
      except OSError as error:
        raise WorkdirError(f"--workdir={workdir} cannot be made ({error.strerror})") from None
    lock = _lock(workdir, is_chief)
    if lock:
      cleanup.callback(lock.release)
    resuming = _all_agree((workdir / "checkpoints").is_dir())
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.checkpoints_to_keep)
    cleanup.callback(checkpointer.close)
    start_step, resumed = 0, None
    if resuming:
      start_step, resumed = restore_newest_verified(
          checkpointer, checkpointer.latest_step() or 0, abstract_state,
          checked_settings(spec, steps.OptimizerSettings.from_section(config.optimizer)
                           .moment_dtype), skip_corrupt, print)
    if start_step > config.train.steps:
      raise ConfigError(f"invalid config:\n  - train.steps={config.train.steps} is below the "
                        f"step of the workdir's newest checkpoint ({start_step}); raise it, or "
                        f"use a new --workdir")
    if is_chief:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
      (workdir / "data_manifest.json").write_text(json.dumps(corpus.manifest, indent=2))
      (workdir / MACHINE_FILE).write_text(json.dumps(machine(), indent=2))
      if corpus.tokenizer and not (workdir / data.TOKENIZER_FILE).exists():
        corpus.tokenizer.save(workdir / data.TOKENIZER_FILE)

    pipeline = pipeline_of(config, mesh)
    if pipeline and is_chief:
      print(pipeline_training.summary(pipeline.schedule, mesh.shape["stage"],
                                      config.train.microbatches), flush=True)
    step_fn = jit_train_step(spec, graphdef, tx, shardings, config.train.microbatches, pipeline)
    run_values = step_arguments_on(config, mesh)
    train_fn = lambda state, batch: step_fn(state, batch, *run_values)
    eval_fn = reused_jit(steps.eval_step, graphdef=graphdef, byte_counts=(
        tuple(np.asarray(corpus.tokenizer.byte_counts).tolist()) if corpus.tokenizer else None))
    initialize = reused_jit(initial_state, out_shardings=shardings,
                            compiler_options=initial_state_compiler_options(), spec=spec, tx=tx)
    seed = replicated_scalar(seed_argument(config.seed), mesh)
    init_fn = lambda: initialize(seed)
    run_eval = functools.partial(evaluate, eval_fn, corpus_windows=validation_windows,
                                 num_batches=data.evaluation_batch_count(
                                     config.train.eval_batches, len(validation_windows),
                                     batch_size),
                                 batch_per_process=batch_per_process, mesh=mesh,
                                 batch_axes=rules["batch"])
    loop = TrainingLoop(config, workdir, mesh, rules["batch"], train_fn, init_fn, run_eval,
                        checkpointer, iter(train_data), abstract_state, schedule, is_chief,
                        live, skip_corrupt, throughput.training_flops_per_token(spec, seq_len))
    try:
      finished = loop.run(start_step, resumed, stop_after_step)
      checkpointer.wait()   # the last save must have succeeded before the run is done
    finally:
      loop.close()
    if not finished:
      return loop.last_eval
    last_eval, eval_counts = loop.last_eval, loop.eval_counts
    if not last_eval:   # resumed at the end: evaluate the restored state
      last_eval, eval_counts = run_eval(loop.state)
    model_state = loop.state.params, loop.state.biases
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if config.train.sample_tokens > 0:   # the chief samples from a whole copy on its host
        model_state = multihost_utils.process_allgather(model_state, tiled=True)
    if is_chief:
      _finish(config, workdir, graphdef, *model_state, corpus.tokenizer, eval_counts, last_eval)
    if jax.process_count() > 1:   # the others wait for the chief's outputs: jax.distributed's
      multihost_utils.sync_global_devices("outputs written")   # shutdown does not wait long
    return last_eval


class TrainingLoop:
  """The step loop: train, check the numbers, log, evaluate, checkpoint, obey stop signals.

  Each step's loss and gradient norm are checked one step late (while the next step runs), and
  every step before a log, evaluation or checkpoint is checked first, so no checkpoint ever
  holds a state that followed bad numbers. A bad step rolls back to the newest checkpoint
  (see `moe_jax.guard`).
  """

  def __init__(self, config, workdir, mesh, batch_axes, train_fn, init_fn, run_eval, checkpointer,
               data_iterator, abstract_state, schedule, is_chief, live, skip_corrupt,
               flops_per_token):
    self.config, self.t, self.mesh, self.batch_axes = config, config.train, mesh, batch_axes
    self.train_fn, self.init_fn, self.run_eval = train_fn, init_fn, run_eval
    self.checkpointer, self.data_iterator = checkpointer, data_iterator
    self.abstract_state, self.schedule, self.is_chief = abstract_state, schedule, is_chief
    self.guard = LossGuard(self.t.spike_factor, self.t.spike_window, self.t.max_rollbacks)
    self.writer = MetricWriter(workdir, enabled=is_chief)
    # A terminal gets a progress bar; a file (a scheduler's log, nohup, a sweep member's log)
    # gets one plain line per log step instead of the bar's carriage-return frames.
    self.interactive = is_chief and sys.stderr.isatty()
    self.bar = tqdm(total=self.t.steps, disable=not self.interactive, unit="step",
                    dynamic_ncols=True, desc="train")
    self.live, self.skip_corrupt = live, skip_corrupt
    if self.live:
      self.say(f"Live routing metrics: http://{self.t.metrics_host}:{self.t.metrics_port}/metrics")
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.flops_per_token = flops_per_token
    self.peak_tflops = throughput.peak_tflops(jax.devices()[0].device_kind, self.t.peak_tflops)
    self.paused_seconds = 0.0   # evaluation and checkpoint time inside the current log window
    self.unchecked, self.pending = [], []    # (step, metrics) not yet checked / not yet logged
    self.last_eval, self.eval_counts, self.last_eval_step = {}, None, 0
    self.state, self.step = None, 0

  def say(self, message: str) -> None:
    if self.is_chief:
      self.bar.write(message)

  @contextlib.contextmanager
  def paused(self):
    """Keeps what runs inside (evaluation, a checkpoint) out of the step timing: the steps
    dispatched before it are waited for first, so their time still counts."""
    jax.block_until_ready(self.state)
    started = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - started

  # -- state ----------------------------------------------------------------------------------

  def load(self, step: int, restored=None) -> None:
    """Takes the state and guard window of the checkpoint at `step` (`restored` when it has
    been read already), or the initial state at step 0."""
    if step:
      restored = restored or self.checkpointer.restore(step, self.abstract_state)
      self.state, data_state, loop_state = restored
      self.guard.restore(loop_state["guard"])
      return data_state
    self.state = self.init_fn()
    self.guard.restore({"recent": []})
    return None

  def save(self) -> None:
    self.guard.checkpointed()
    self.checkpointer.save(self.step, self.state, self.data_iterator.get_state(),
                           {"guard": self.guard.state()}, self.config.to_dict())

  # -- the loop -------------------------------------------------------------------------------

  def run(self, start_step: int, resumed, stop_after_step: int | None) -> bool:
    """Trains from `start_step` (its checkpoint `resumed`) to train.steps; False when it
    stopped early at `stop_after_step`."""
    data_state = self.load(start_step, resumed)
    self.step = start_step
    self.writer.rewind(start_step)   # records past the checkpoint (all, from step 0) go
    if start_step:
      self.data_iterator.set_state(data_state)
      self.say(f"Resumed from the checkpoint at step {start_step} in {self.checkpointer.manager.directory}")
    self.bar.update(start_step)
    t = self.t
    with StopSignals(on_request=lambda name: self.say(
        f"{name} received: saving a checkpoint after this step, then exiting "
        f"(Ctrl-C again aborts without saving)")) as signals:
      self.restart_clock()
      while self.step < t.steps:
        batch = parallel.global_batch(next(self.data_iterator), self.mesh, self.batch_axes)
        self.state, metrics = self.train_fn(self.state, batch)
        self.step += 1
        self.bar.update(1)
        self.unchecked.append((self.step, metrics))
        due = lambda every: self.step % every == 0 or self.step == t.steps
        boundary = due(t.log_every) or due(t.eval_every) or due(t.checkpoint_every)
        preempted_by, save_failure = self.stop_requests(signals, boundary)
        if save_failure:   # nothing trained after it could be saved
          raise (save_failure.stopped_after(self.step)
                 if isinstance(save_failure, CheckpointSaveFailed) else save_failure)
        stopping = preempted_by or self.step == stop_after_step
        boundary = boundary or stopping
        if not self.check(keep_last=0 if boundary else 1):
          continue   # rolled back
        if self.step == start_step + 1:   # keep compilation out of tokens/s
          self.restart_clock()
        if due(t.log_every) or (stopping and self.pending):   # a stop logs its partial window
          self.log()
        if due(t.eval_every):
          with self.paused():
            self.last_eval, self.eval_counts = self.run_eval(self.state)
          self.last_eval_step = self.step
          self.writer.write(self.step, self.last_eval)
          self.say(f"step {self.step}: " + ", ".join(
              f"{k}={v:.4f}" for k, v in self.last_eval.items() if "/" not in k))
        if due(t.checkpoint_every) or stopping:
          with self.paused():
            self.save()
        if preempted_by:
          self.writer.write_event(self.step, "preempted", signal=preempted_by)
          raise Preempted(preempted_by, self.step)
        if stopping:
          return False
    return True

  def stop_requests(self, signals: StopSignals, boundary: bool):
    """(name of the signal that asks to stop after this step, a failed background save),
    either None. Several processes must stop at the same step: they agree at log, evaluation
    and checkpoint steps (a signal to, or a failed save on, any one of them stops all)."""
    if jax.process_count() == 1:
      return (signals.received.name if signals.requested else None,
              self.checkpointer.save_failure())
    if not boundary:
      return None, None
    from jax.experimental import multihost_utils
    failure = self.checkpointer.save_failure()
    received = np.int32(int(signals.received) if signals.requested else 0)
    agreed = multihost_utils.process_allgather(np.array([received, failure is not None], np.int32))
    agreed = np.max(np.reshape(agreed, (-1, 2)), axis=0)
    if agreed[1] and failure is None:
      failure = RuntimeError("a checkpoint save failed on another process; run the same "
                             "command again to resume from the newest complete checkpoint")
    return (signal.Signals(int(agreed[0])).name if agreed[0] else None), failure

  def check(self, keep_last: int) -> bool:
    """Checks the losses of all unchecked steps but the newest `keep_last`; on a bad one rolls
    back and returns False. Checked steps move to the log window."""
    ready = self.unchecked[:len(self.unchecked) - keep_last]
    if not ready:
      return True
    del self.unchecked[:len(ready)]
    values = jax.device_get([(m["loss"], m["grad_norm"]) for _, m in ready])
    for (step, metrics), (loss, grad_norm) in zip(ready, values):
      problem = self.guard.problem(float(loss), float(grad_norm))
      if problem:
        self.rollback(step, problem)
        return False
      self.guard.accept(float(loss))
      self.pending.append(metrics)
    return True

  def rollback(self, bad_step: int, reason: str) -> None:
    """Back to the newest checkpoint; the batches used since are skipped (the data iterator
    is not rewound)."""
    self.guard.rolled_back(reason)   # raises TrainingDiverged after too many in a row
    self.unchecked.clear()
    self.pending.clear()
    self.checkpointer.wait()
    restored, from_disk = restore_newest_verified(
        self.checkpointer, self.checkpointer.latest_step() or 0, self.abstract_state, None,
        self.skip_corrupt, self.say)
    self.load(restored, from_disk)
    skipped = self.step - restored
    self.writer.rewind(restored)
    self.writer.write_event(bad_step, "rollback", reason=reason, restored_step=restored,
                            skipped_batches=skipped)
    self.say(f"step {bad_step}: {reason}; rolled back to "
             f"{'the checkpoint of step ' + str(restored) if restored else 'the initial state'} "
             f"and skipped the {skipped} batches used since (rollback "
             f"{self.guard.rollbacks_in_a_row} of at most {self.t.max_rollbacks} in a row)")
    if self.last_eval_step > restored:
      self.last_eval, self.eval_counts, self.last_eval_step = {}, None, 0
    self.step = restored
    self.bar.n = restored
    self.bar.refresh()
    self.restart_clock()

  # -- logging --------------------------------------------------------------------------------

  def restart_clock(self) -> None:
    self.last_log_time, self.last_log_step = time.perf_counter(), self.step
    self.paused_seconds = 0.0

  def log(self) -> None:
    fetched = jax.device_get(self.pending)     # the one host transfer of the whole log window
    self.pending = []
    now = time.perf_counter()
    scalars = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1] if k != "routing"}
    histograms = {}
    if "routing" in fetched[-1]:
      routing_scalars, details, histograms = summarize_routing(
          [f["routing"] for f in fetched], self.tokens_per_step * len(fetched))
      # [L, E] in the statistics' layer order: a scanned stack's bias is one [L_stack, E]
      # leaf beside the MTP blocks' [E] ones (not the replica plans).
      biases = jax.device_get(jax.tree.leaves(self.state.biases.filter(BalancingBias)))
      details["bias"] = np.concatenate([np.reshape(b, (-1, b.shape[-1])) for b in biases]
                                       ).astype(np.float64).round(7).tolist()
      scalars.update(routing_scalars)
      self.writer.write_details(self.step, details)
      if self.live:
        self.live.update(self.step, scalars, details["load"])
    step_time = now - self.last_log_time - self.paused_seconds
    if self.step > self.last_log_step and step_time > 0:
      scalars.update(throughput.step_numbers(
          self.step - self.last_log_step, self.tokens_per_step, step_time, self.flops_per_token,
          jax.device_count(), self.peak_tflops))
    scalars.update(throughput.device_memory_gib())
    scalars["learning_rate"] = float(self.schedule(self.step - 1))
    self.writer.write(self.step, scalars, histograms)
    if self.interactive:
      self.bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                           maxvio=f"{scalars.get('max_violation', 0):.2f}",
                           tok_s=f"{scalars.get('tokens_per_second', 0):.0f}")
    else:
      self.say(log_line(self.step, self.t.steps, scalars))
    self.restart_clock()

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def log_line(step: int, steps: int, scalars: dict[str, float]) -> str:
  """One plain line of a log step, for output that is not a terminal."""
  parts = [f"step {step}/{steps}", f"loss {scalars['loss']:.4f}"]
  if "max_violation" in scalars:
    parts.append(f"maxvio {scalars['max_violation']:.3f}")
  if "tokens_per_second" in scalars:
    parts += [f"{scalars['tokens_per_second']:,.0f} tokens/s",
              f"{scalars['step_seconds'] * 1e3:.1f} ms/step",
              f"{scalars['tflops_per_device']:.3g} TFLOP/s/device"]
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  if "memory_in_use_gib" in scalars:
    parts.append(f"memory {scalars['memory_in_use_gib']:.2f} GiB (peak "
                 f"{scalars['memory_peak_gib']:.2f})")
  parts.append(f"lr {scalars['learning_rate']:.3g}")
  return " | ".join(parts)


def _finish(config, workdir, graphdef, params, biases, tokenizer, eval_counts, last_eval):
  """The end-of-run artifacts: final metrics, a text sample and the expert-load plot."""
  (workdir / "final_metrics.json").write_text(json.dumps(last_eval, indent=2))
  sample = tokenizer is not None and config.train.sample_tokens > 0
  if sample:
    text = sample_text(graphdef, params, biases, tokenizer, config.train.sample_prompt,
                       config.train.sample_tokens, config.data.seq_len, seed=config.seed)
    (workdir / "sample.txt").write_text(text)
    print("\n--- sample ---\n" + text + "\n--------------")
  if eval_counts is not None:
    (workdir / "expert_load.json").write_text(json.dumps(
        {"step": config.train.steps, "counts": np.asarray(eval_counts).tolist()}))
    plot_expert_load(eval_counts, workdir / "expert_load.png",
                     f"validation expert load, step {config.train.steps}")
  print(f"\nOutputs in {workdir.absolute()}: metrics.jsonl, routing.jsonl, tensorboard/, checkpoints/, "
        f"final_metrics.json, data_manifest.json"
        + (f", {data.TOKENIZER_FILE}" if tokenizer and tokenizer.kind == "bpe" else "")
        + (", sample.txt" if sample else "")
        + (", expert_load.png/.json" if eval_counts is not None else ""))
