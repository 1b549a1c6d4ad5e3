"""The device mesh and where arrays live on it, through logical axis names.

Mesh axes: `data`, `fsdp`, `tensor`, `expert` and `stage` (MESH_AXES), over one slice through
`jax.make_mesh` or, for several hosts or TPU slices, as a hybrid mesh whose `dcn` sizes say
how many granules each axis spans. Every parameter dimension carries a logical name given
where the parameter is created (moe_jax/layers/params.py; a scanned stack's leading dimension
is "layers"), and the batch is "batch"; the config's `sharding` rules map each logical name to
mesh axes (none: replicated). Defaults (DEFAULT_RULES): the batch over `data`, `fsdp` and
`expert`, model-width dimensions over `fsdp`, heads and MLP widths over `tensor`, routed
experts over `expert`. Optimizer moments follow their parameters; with ZeRO-1 they are split
over `data` too. With pipeline stages (`stage` > 1) the MoE block stack's variables and their
moments are split over `stage` along their leading layer axis: each stage device holds its
stages' blocks (moe_jax/pipeline/training.py).
"""

import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.layers.params import logical_axes

# stage: pipeline stages (the MoE blocks split into consecutive groups); data: replicas of the
# model; fsdp: replicas whose parameters, gradients and optimizer state are split among them
# (gathered per layer by XLA); tensor: attention heads and MLP widths split; expert: routed
# experts split (and tokens, outside the experts).
MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")
STAGE_STACK = "moe_blocks"   # the stack of blocks that pipeline stages split
BATCH_AXES = ("data", "fsdp", "expert")     # every axis that splits tokens


DCN_AXES = tuple(f"dcn_{axis}" for axis in MESH_AXES)   # config: how many granules each spans


def granule_count() -> int:
  """Groups of devices joined by the data-centre network rather than the chips' interconnect:
  TPU slices where the devices say which slice they are on, else processes (hosts)."""
  if jax.default_backend() == "tpu":
    return len({getattr(d, "slice_index", 0) for d in jax.devices()})
  return jax.process_count()


def make_mesh(data_size: int, expert_size: int, devices=None, *, fsdp: int = 1,
              tensor: int = 1, stage: int = 1, dcn: dict[str, int] | None = None) -> Mesh:
  """The mesh of MESH_AXES, `expert` varying fastest: over every device through
  `jax.make_mesh` (which orders them by the machine's topology: neighbours in the interconnect
  on the inner axes), or over `devices` in their given order. With `dcn` ({axis: granules}),
  a hybrid mesh: each axis of size n spans dcn[axis] granules (slices or hosts) of
  n / dcn[axis] devices each, so only those axes' collectives cross the slower network."""
  shape = (data_size, fsdp, tensor, expert_size, stage)
  types = (jax.sharding.AxisType.Auto,) * len(shape)
  dcn_shape = tuple((dcn or {}).get(axis, 1) for axis in MESH_AXES)
  if math.prod(dcn_shape) > 1:
    from jax.experimental import mesh_utils
    devices = list(jax.devices() if devices is None else devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(n // d for n, d in zip(shape, dcn_shape)), dcn_shape, devices,
        process_is_granule=devices[0].platform != "tpu")
    return Mesh(grid, MESH_AXES, axis_types=types)
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axes=BATCH_AXES) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(batch_axes) or None))


def global_batch(local_batch: np.ndarray, mesh: Mesh, batch_axes=BATCH_AXES) -> jax.Array:
  """This process's rows of the batch -> one global array split over the token axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axes), local_batch)


LOGICAL_AXES = ("batch", "experts", "router", "embed", "mlp", "heads", "kv_heads", "head_dim",
                "latent", "vocab", "layers")
DEFAULT_RULES = {"batch": BATCH_AXES, "experts": ("expert",), "embed": ("fsdp",),
                 "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",)}


def parse_rules(sharding_config) -> dict[str, tuple[str, ...]]:
  """config.sharding {logical name: "mesh_axis,mesh_axis" or ""} -> {name: (mesh axes)}."""
  return {name: tuple(a for a in str(value).split(",") if a)
          for name, value in dict(sharding_config).items()}


def per_device_bytes(tree) -> int:
  """Bytes of `tree`'s leaves (arrays or ShapeDtypeStructs, with shardings or whole) that one
  device holds."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def logical_spec(logical_names, rules) -> P:
  """Logical names of an array's dimensions -> its PartitionSpec under `rules`."""
  def mesh_axes(name):
    axes = tuple(rules.get(name, ()))
    return None if not axes else axes[0] if len(axes) == 1 else axes
  return P(*[mesh_axes(n) for n in logical_names])


class LayoutError(ValueError):
  """A sharding rule does not fit a parameter's shape."""


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
  """`blocks.1.mlp.w_gate` for a key path into a state."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return ".".join(str(k) for k in keys)


def _also_over_data(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` with `data` added to the first dimension whose size its split leaves divisible
  by the data size (unchanged when data is 1, already used, or no dimension divides)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  as_tuple = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  data = mesh.shape["data"]
  if data == 1 or any("data" in as_tuple(axes) for axes in entries):
    return spec
  for i, (size, axes) in enumerate(zip(shape, entries)):
    parts = int(np.prod([mesh.shape[a] for a in as_tuple(axes)]))
    if size % (parts * data) == 0:
      axes = (*as_tuple(axes), "data")
      entries[i] = axes[0] if len(axes) == 1 else axes
      while entries and entries[-1] is None:
        entries.pop()
      return P(*entries)
  return spec


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES, shard_optimizer_over_data: bool = False):
  """A NamedSharding per leaf of a TrainState, from each variable's logical names and the rules.

  With `shard_optimizer_over_data` (ZeRO-1) the optimizer moments are split over `data` too,
  on top of their parameter's split (fsdp, tensor, expert), along their first dimension
  where it divides (`_also_over_data`). A parameter created without
  logical names, or a rule that does not fit a parameter, is a LayoutError.
  """
  # A mesh axis of size 1 splits nothing: left out, so that a replicated parameter reads as one.
  rules = {name: tuple(a for a in axes if mesh.shape[a] > 1) for name, axes in rules.items()}

  def spec_for(path, variable) -> P:
    names = logical_axes(variable)
    if names is None:
      raise LayoutError(f"{_path_name(path)} was created without logical axis names "
                        f"(moe_jax/layers/params.py)")
    used = [a for n in names for a in rules.get(n, ())]
    if len(used) != len(set(used)):
      raise LayoutError(f"sharding: parameter {_path_name(path)} "
                        f"({', '.join(map(str, names))}) would use a mesh axis twice: {used}")
    spec = logical_spec(names, rules)
    for size, name, axes in zip(variable.shape, names, spec):
      parts = 1 if axes is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]))
      if size % parts:
        raise LayoutError(f"sharding.{name}={','.join(np.atleast_1d(axes))!s}: "
                          f"{_path_name(path)} has {size} along '{name}', not "
                          f"divisible by {parts} devices")
    return spec

  def over_stages(path, spec: P, shape) -> P:
    """The MoE block stack's leading (layer) axis over `stage`, when there are stages (and its
    blocks split evenly over the stage devices)."""
    keys = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if mesh.shape.get("stage", 1) == 1 or STAGE_STACK not in keys:
      return spec
    if shape[0] % mesh.shape["stage"]:   # each stage device holds the whole stack
      return spec
    return P("stage", *list(spec)[1:])

  def for_params(path, variable):
    spec = over_stages(path, spec_for(path, variable), variable.shape)
    return variable.replace(NamedSharding(mesh, spec))

  def for_optimizer(path, leaf):
    if not _is_variable(leaf):   # the optimizer's own counters
      return NamedSharding(mesh, P())
    spec = over_stages(path, spec_for(path, leaf), leaf.shape)
    if shard_optimizer_over_data:
      spec = _also_over_data(spec, leaf.shape, mesh)
    return leaf.replace(NamedSharding(mesh, spec))

  with_path = functools.partial(jax.tree_util.tree_map_with_path, is_leaf=_is_variable)
  return type(state)(NamedSharding(mesh, P()), with_path(for_params, state.params),
                     with_path(for_params, state.biases), with_path(for_optimizer, state.opt_state))
