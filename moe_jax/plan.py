"""A memory plan before a run: what one device holds to train a config on a mesh, from
abstract arrays and the run's own shardings; nothing is allocated or compiled.

  python -m moe_jax.plan --config=configs/deepseek.py:v3 --mesh=fsdp=64,expert=8
  python -m moe_jax.plan --config=configs/deepseek.py:v3 --find --device=h200

Per device:
- parameters, gradients (laid out as the parameters, float32; two copies with micro-batches)
  and optimizer state: the shard shapes of the abstract training state under the config's
  `sharding` rules on an abstract mesh;
- activations kept: what the forward pass keeps for the backward pass under `model.remat`
  (the residuals of `jax.vjp`, traced on abstract arrays, their part that grows with the
  batch) for one device's share of one micro-batch, attention traced as the target device
  runs it (where cuDNN's fused kernel would run, a path that keeps what it keeps);
- backward working memory: the backward pass through the widest block, which holds the
  block's activations without remat (recomputed, or their cotangents), its weights gathered
  over fsdp in the compute dtype and their float32 gradients before the reduce-scatter.
`--find` looks for the fewest devices of a kind (powers of two) on which some mesh of fsdp x
tensor x expert holds the config, each device training `--batch_per_device` sequences per
micro-batch (data replicas only add memory, so the search leaves `data` at 1).
tests/test_plan.py checks the figures against XLA's memory analysis of the compiled step.
"""

import dataclasses
import functools
import math
import sys

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import checkpoint, parallel, routing, steps
from moe_jax.closed_pipe import quiet_exit_status
from moe_jax.config_validation import ConfigError, dcn_sizes, validate_config
from moe_jax.main import (config_argument, config_file_problem, override_problem,
                          with_located_config)
from moe_jax.layers.params import ParamKeys, logical_axes
from moe_jax.model import DTYPES, Block, ModelSpec, parameter_counts
from moe_jax.paths import DEFAULT_CONFIG

GIB = 2 ** 30
# What one device holds, GiB (NVIDIA's "141 GB" H200 reports 143,771 MiB).
DEVICE_MEMORY_GIB = {"h200": 140, "h100": 80, "a100": 80, "b200": 179, "tpu-v5p": 95,
                     "tpu-v5e": 16, "tpu-v6e": 32, "tpu-v4": 32}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes on one device of a training step."""

  mesh: dict[str, int]
  parameters: int
  gradients: int
  optimizer: int
  kept_activations: int   # residuals the forward pass keeps for the backward pass
  working: int            # the backward pass through one block (activations, gathered weights)

  @property
  def total(self) -> int:
    return (self.parameters + self.gradients + self.optimizer + self.kept_activations
            + self.working)


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=8)
def _model_residual_bytes(spec: ModelSpec, batch: int, seq_len: int) -> int:
  """Bytes the forward pass of the whole model keeps for its backward pass, on `batch`
  sequences of `seq_len` tokens (abstract: nothing runs)."""
  tx = steps.make_optimizer(1e-3, 0.9, 0.95, 0.0, 1.0)
  graphdef, state = steps.abstract_state(spec, tx, 0)
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32)

  def residuals(params, biases, tokens):
    loss = lambda p: steps.loss_fn(p, biases, graphdef, tokens, 0.3,
                                   routing.BalancingValues.of(spec.balancing))[0]
    return jax.tree.leaves(jax.vjp(loss, params)[1])

  return _tree_bytes(jax.eval_shape(residuals, state.params, state.biases, tokens))


def _block(spec: ModelSpec, use_moe: bool) -> Block:
  return nnx.eval_shape(lambda: Block(spec, use_moe, ParamKeys(0)))


@functools.lru_cache(maxsize=16)
def _block_residual_bytes(spec: ModelSpec, use_moe: bool, batch: int, seq_len: int) -> int:
  """Bytes one block's forward keeps for its backward (no remat) on `batch` sequences."""
  graphdef, state = nnx.split(_block(spec.replace(remat="none"), use_moe))
  x = jax.ShapeDtypeStruct((batch, seq_len, spec.d_model), DTYPES[spec.compute_dtype])

  def residuals(state, x):
    run = lambda state, x: nnx.merge(graphdef, state)(x, np.arange(seq_len))[0]
    return jax.tree.leaves(jax.vjp(run, state, x)[1])

  return _tree_bytes(jax.eval_shape(residuals, state, x))


def activation_bytes(spec: ModelSpec, batch: int, seq_len: int) -> int:
  """What the forward pass keeps for the backward pass per `batch` sequences: the residuals'
  part that grows with the batch (R(2b) - R(b)); the rest are casts and copies of weights,
  counted with one block's gathered weights in `working_bytes`."""
  return (_model_residual_bytes(spec, 2 * batch, seq_len)
          - _model_residual_bytes(spec, batch, seq_len))


def _kinds(spec: ModelSpec) -> set[bool]:
  """Which blocks the model has: MoE (True), dense (False)."""
  return {spec.num_dense_layers < spec.num_layers, spec.num_dense_layers > 0}


def working_bytes(spec: ModelSpec, batch: int, seq_len: int, mesh_sizes: dict[str, int],
                  rules: dict) -> int:
  """What the backward pass through the widest block holds beyond what is kept: its
  activations without remat (recomputed, or their cotangents), its weights gathered over the
  axes that split parameters but not the work (fsdp, in the compute dtype) and their float32
  gradients before the reduce-scatter."""
  unsplit = {name: tuple(a for a in axes if a not in ("data", "fsdp") and mesh_sizes[a] > 1)
             for name, axes in rules.items()}
  dtype_bytes = np.dtype(DTYPES[spec.compute_dtype]).itemsize
  widest = 0
  for use_moe in _kinds(spec):
    activations = (_block_residual_bytes(spec, use_moe, 2 * batch, seq_len)
                   - _block_residual_bytes(spec, use_moe, batch, seq_len))
    gathered = 0
    for _, variable in nnx.to_flat_state(nnx.state(_block(spec, use_moe), nnx.Param)):
      split = parallel.logical_spec(logical_axes(variable), unsplit)
      parts = math.prod(math.prod(mesh_sizes[a] for a in ((axes,) if isinstance(axes, str)
                                                          else axes))
                        for axes in split if axes)
      gathered += math.prod(variable.shape) // parts
    widest = max(widest, activations + gathered * (dtype_bytes + 4))
  return widest


def _traced_attention(spec: ModelSpec, backend: str) -> str:
  """The attention path to trace for a run on `backend`: where it would take cuDNN's fused
  kernel, the XLA path that keeps what that kernel keeps (q, k, v) instead of the scores."""
  chosen = spec.attention_path(backend)
  return "xla_recompute" if chosen == "cudnn" else chosen


@functools.lru_cache(maxsize=4)
def _abstract_state(spec: ModelSpec, optimizer: steps.OptimizerSettings, total_steps: int):
  """The training state's ShapeDtypeStructs (the optimizer's state depends on its settings)."""
  return steps.abstract_state(spec, optimizer.make(total_steps)[1], 0)[1]


def plan(config, mesh_sizes: dict[str, int], backend: str = "gpu") -> MemoryPlan:
  """The per-device plan of a config (validated for the mesh's size) on a mesh of
  `mesh_sizes` (every axis of parallel.MESH_AXES) of `backend` devices ("gpu": NVIDIA's)."""
  if mesh_sizes["stage"] > 1:
    raise ConfigError(f"invalid config:\n  - mesh.stage={mesh_sizes['stage']}: the plan does not "
                      f"model pipeline stages yet (a stage device holds its stages' blocks and "
                      f"several micro-batches' activations); `python -m moe_jax.main ... "
                      f"--dry_run` gives XLA's figure for the compiled pipelined step")
  mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in parallel.MESH_AXES),
                                   parallel.MESH_AXES)
  spec = ModelSpec.from_config(config)
  rules = parallel.parse_rules(config.sharding)
  abstract = _abstract_state(spec, steps.OptimizerSettings.from_section(config.optimizer),
                             config.train.steps)
  try:
    shardings = parallel.state_shardings(abstract, mesh, rules, config.optimizer.shard_over_data)
  except parallel.LayoutError as error:
    raise ConfigError(f"invalid config:\n  - {error}") from None
  state = checkpoint.abstract_like(abstract, shardings)
  # Activations of one device's tokens, dispatched locally (the expert exchange moves about
  # as many tokens as it receives).
  spec = spec.replace(dispatch=spec.dispatch.on_one_device(),
                      attention_implementation=_traced_attention(spec, backend))
  token_split = math.prod(mesh_sizes[a] for a in rules["batch"])
  batch = config.data.batch_size // (config.train.microbatches * token_split)
  # With micro-batches the step holds the running sum of gradients and the current slice's.
  gradient_copies = 2 if config.train.microbatches > 1 else 1
  held = parallel.per_device_bytes
  return MemoryPlan(mesh_sizes, held((state.params, state.biases)),
                    gradient_copies * held(state.params), held(state.opt_state),
                    activation_bytes(spec, batch, config.data.seq_len),
                    working_bytes(spec, batch, config.data.seq_len, mesh_sizes, rules))


def _with(config, mesh_sizes: dict[str, int], batch_size: int | None = None):
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(mesh_sizes)
  if batch_size is not None:
    config.data.batch_size = batch_size
  return config


def candidate_meshes(spec: ModelSpec, devices: int) -> list[dict[str, int]]:
  """fsdp x tensor x expert meshes of `devices` (powers of two): experts and heads divide."""
  meshes = []
  for tensor in (1, 2, 4, 8):
    for expert in (2 ** k for k in range(int(math.log2(devices)) + 1)):
      if (tensor * expert > devices or spec.num_heads % tensor or spec.num_kv_heads % tensor
          or spec.num_routed_experts % expert):
        continue
      meshes.append({"data": 1, "fsdp": devices // (tensor * expert), "tensor": tensor,
                     "expert": expert, "stage": 1})
  return meshes


def find(config, device_bytes: float, batch_per_device: int, max_devices: int = 2 ** 16,
         progress=None, backend: str = "gpu"):
  """(devices, plan) of the fewest devices (a power of two) on which a mesh holds the config
  with `batch_per_device` sequences per device and micro-batch; None when none up to
  `max_devices` does. Each candidate is validated like a run's config."""
  spec = ModelSpec.from_config(config)
  devices = 1
  while devices <= max_devices:
    best = None
    for mesh_sizes in candidate_meshes(spec, devices):
      split = mesh_sizes["fsdp"] * mesh_sizes["expert"]
      candidate = _with(config, mesh_sizes,
                        batch_per_device * split * config.train.microbatches)
      try:
        validate_config(candidate, devices, backend, granules=_granules(candidate))
        p = plan(candidate, mesh_sizes, backend)
      except ConfigError:
        continue
      if best is None or p.total < best.total:
        best = p
    if progress and best is not None:
      progress(f"{devices:6d} devices: {_gb(best.total)} per device at best "
               f"({_mesh_name(best.mesh)})")
    if best is not None and best.total <= device_bytes:
      return devices, best
    devices *= 2
  return None


def _granules(config) -> int:
  """The granules a hybrid mesh asks for (the plan is of one device: any number will do)."""
  return math.prod(dcn_sizes(config).values())


def _mesh_name(sizes: dict[str, int]) -> str:
  return " x ".join(f"{a} {n}" for a, n in sizes.items() if n > 1) or "one device"


def _gb(n: float) -> str:
  return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2 ** 20:,.1f} MiB"


def report(p: MemoryPlan, config, device_bytes: float | None) -> str:
  spec = ModelSpec.from_config(config)
  counts = parameter_counts(spec)
  devices = math.prod(p.mesh.values())
  lines = [
      f"model: {counts['total'] / 1e6:,.1f}M parameters ({counts['active'] / 1e6:,.1f}M per "
      f"token), model.remat={spec.remat!r}, model.scan_layers={spec.scan_layers}",
      f"mesh: {_mesh_name(p.mesh)} "
      f"({devices} device{'s' * (devices > 1)}); batch {config.data.batch_size} x "
      f"{config.data.seq_len} tokens in {config.train.microbatches} micro-batch(es)",
      "per device:",
      f"  parameters        {_gb(p.parameters):>12}",
      f"  gradients         {_gb(p.gradients):>12}"
      + ("   (their sum over micro-batches and the current one's)"
         if config.train.microbatches > 1 else ""),
      f"  optimizer state   {_gb(p.optimizer):>12}",
      f"  activations kept  {_gb(p.kept_activations):>12}   (for the backward pass)",
      f"  backward working  {_gb(p.working):>12}   (one block at a time: activations, "
      f"weights and gradients gathered over fsdp)",
      f"  total             {_gb(p.total):>12}",
  ]
  if device_bytes:
    verdict = "fits" if p.total <= device_bytes else "does NOT fit"
    lines.append(f"{verdict} in {_gb(device_bytes)} per device "
                 f"({100 * p.total / device_bytes:.0f}% used)")
  return "\n".join(lines)


def _mesh_flag(text: str) -> dict[str, int]:
  sizes = {}
  for item in filter(None, text.split(",")):
    axis, _, size = item.partition("=")
    if axis not in parallel.MESH_AXES or not size.isdigit() or int(size) < 1:
      raise ConfigError(f"--mesh={text}: expected AXIS=SIZE,... with axes "
                        f"{list(parallel.MESH_AXES)}, e.g. --mesh=fsdp=8,expert=4")
    sizes[axis] = int(size)
  return {a: sizes.get(a, 1) for a in parallel.MESH_AXES}


def _device_bytes(device: str, device_memory: float) -> float | None:
  if device_memory > 0:
    return device_memory * GIB
  if device:
    if device.lower() not in DEVICE_MEMORY_GIB:
      raise ConfigError(f"--device={device}: unknown; known {sorted(DEVICE_MEMORY_GIB)}, or give "
                        f"--device_memory in GiB")
    return DEVICE_MEMORY_GIB[device.lower()] * GIB
  return None


def _flag_problems(device_memory: float, usable_fraction: float, batch_per_device: int) -> list[str]:
  """The command's own numeric flags out of range, one line each."""
  problems = []
  if device_memory < 0:
    problems.append(f"--device_memory={device_memory:g} must be a size in GiB above 0")
  if not 0 < usable_fraction <= 1:
    problems.append(f"--usable_fraction={usable_fraction:g} must be in (0, 1]")
  if batch_per_device < 1:
    problems.append(f"--batch_per_device={batch_per_device} must be >= 1")
  return problems


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  try:
    problems = _flag_problems(f.device_memory, f.usable_fraction, f.batch_per_device)
    if problems:
      raise ConfigError("; ".join(problems))
    device_bytes = _device_bytes(f.device, f.device_memory)
    backend = "tpu" if f.device.lower().startswith("tpu") else "gpu"
    if f.find:
      if not device_bytes:
        raise ConfigError("--find needs --device or --device_memory")
      found = find(config, device_bytes * f.usable_fraction, f.batch_per_device,
                   progress=lambda line: print(line, flush=True), backend=backend)
      if found is None:
        print(f"no mesh of up to {2 ** 16} devices holds this config", flush=True)
        return 1
      devices, best = found
      print(f"fewest devices of {_gb(device_bytes)} ({100 * f.usable_fraction:.0f}% usable): "
            f"{devices}", flush=True)
      print(report(best, _with(config, best.mesh, f.batch_per_device * best.mesh["fsdp"]
                               * best.mesh["expert"] * config.train.microbatches),
                   device_bytes * f.usable_fraction))
      return 0
    sizes = _mesh_flag(f.mesh) if f.mesh else {a: max(int(config.mesh.get(a, 1)), 1)
                                                 for a in parallel.MESH_AXES}   # -1: one
    config = _with(config, sizes)
    validate_config(config, math.prod(sizes.values()), backend, granules=_granules(config))
    print(report(plan(config, sizes, backend), config,
                 device_bytes * f.usable_fraction if device_bytes else None))
    return 0
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file, "
                                  "PATH[:ARG], with --config.SECTION.FIELD=VALUE overrides.",
                                  lock_config=True)
  flags.DEFINE_string("mesh", "", "Mesh sizes AXIS=SIZE,... (axes data, fsdp, tensor, expert, stage; "
                      "absent ones 1); default: the config's mesh section, -1 read as 1.")
  flags.DEFINE_string("device", "", f"Device kind whose memory to compare with: "
                      f"{', '.join(sorted(DEVICE_MEMORY_GIB))}.")
  flags.DEFINE_float("device_memory", 0.0, "Memory of one device in GiB (instead of --device).")
  flags.DEFINE_float("usable_fraction", 0.9, "Share of a device's memory a run can use (the "
                     "rest: the runtime, fragmentation; JAX takes 75% unless "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).")
  flags.DEFINE_bool("find", False, "Find the fewest devices (powers of two) that hold the config.")
  flags.DEFINE_integer("batch_per_device", 1, "--find: sequences per device per micro-batch.")


def cli() -> None:
  problem = config_file_problem(config_argument(sys.argv[1:]))
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  sys.argv = with_located_config(sys.argv)
  try:
    define_flags()
    flags.FLAGS(sys.argv)
  except Exception as error:   # noqa: BLE001 - a mistake in the flags or overrides
    print(f"error: {override_problem(error, sys.argv)}", file=sys.stderr)
    sys.exit(2)
  try:
    sys.exit(main(None))
  except BrokenPipeError:   # the report piped into a reader that stopped (`| head`)
    sys.exit(quiet_exit_status())


if __name__ == "__main__":
  cli()
