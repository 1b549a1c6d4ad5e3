"""The device mesh and where arrays live on it, through logical axis names.

Mesh axes: `data` and `expert`. Every parameter dimension and the batch carry a logical
name (`PARAM_LOGICAL_AXES`, "batch"); the config's `sharding` rules map each logical name to
mesh axes (none: replicated). Defaults: the batch over `data` and `expert`, routed experts
over `expert`, everything else replicated. Optimizer moments follow their parameters, or with
ZeRO-1 the moments of replicated parameters go over `data`.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert")
BATCH_AXES = ("data", "expert")     # every axis that splits tokens


def make_mesh(data_size: int, expert_size: int, devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(data_size, expert_size), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axes=BATCH_AXES) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(batch_axes) or None))


def global_batch(local_batch: np.ndarray, mesh: Mesh, batch_axes=BATCH_AXES) -> jax.Array:
  """This process's rows of the batch -> one global array split over the token axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axes), local_batch)


# Logical axis names of every parameter, by its attribute name and rank.
PARAM_LOGICAL_AXES = {
    ("embed", 2): ("vocab", "embed"),
    ("unembed", 2): ("embed", "vocab"),
    ("w_q", 3): ("embed", "heads", "head_dim"),
    ("w_k", 3): ("embed", "kv_heads", "head_dim"),
    ("w_v", 3): ("embed", "kv_heads", "head_dim"),
    ("w_o", 3): ("heads", "head_dim", "embed"),
    ("w_q_down", 2): ("embed", "latent"),
    ("q_norm_scale", 1): ("latent",),
    ("w_q_up", 3): ("latent", "heads", "head_dim"),
    ("w_kv_down", 2): ("embed", "latent"),
    ("kv_norm_scale", 1): ("latent",),
    ("w_kv_up", 3): ("latent", "heads", "head_dim"),
    ("router_kernel", 2): ("embed", "router"),
    ("balancing_bias", 1): ("router",),
    ("w_gate", 3): ("experts", "embed", "mlp"),
    ("w_up", 3): ("experts", "embed", "mlp"),
    ("w_down", 3): ("experts", "mlp", "embed"),
    ("w_gate", 2): ("embed", "mlp"),
    ("w_up", 2): ("embed", "mlp"),
    ("w_down", 2): ("mlp", "embed"),
    ("scale", 1): ("embed",),
}
LOGICAL_AXES = ("batch", "experts", "router", "embed", "mlp", "heads", "kv_heads", "head_dim",
                "latent", "vocab")
DEFAULT_RULES = {"batch": BATCH_AXES, "experts": ("expert",)}


def parse_rules(sharding_config) -> dict[str, tuple[str, ...]]:
  """config.sharding {logical name: "mesh_axis,mesh_axis" or ""} -> {name: (mesh axes)}."""
  return {name: tuple(a for a in str(value).split(",") if a)
          for name, value in dict(sharding_config).items()}


def logical_spec(logical_names, rules) -> P:
  """Logical names of an array's dimensions -> its PartitionSpec under `rules`."""
  def mesh_axes(name):
    axes = tuple(rules.get(name, ()))
    return None if not axes else axes[0] if len(axes) == 1 else axes
  return P(*[mesh_axes(n) for n in logical_names])


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def param_logical_axes(path, leaf) -> tuple[str, ...] | None:
  """The logical names of a parameter (or of an optimizer moment mirroring it)."""
  ndim = getattr(leaf, "ndim", 0)
  for name in reversed(_names(path)):
    if (name, ndim) in PARAM_LOGICAL_AXES:
      return PARAM_LOGICAL_AXES[(name, ndim)]
  return None


class LayoutError(ValueError):
  """A sharding rule does not fit a parameter's shape."""


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES, shard_optimizer_over_data: bool = False):
  """A NamedSharding per leaf of a TrainState, from the logical names and the rules.

  With `shard_optimizer_over_data` (ZeRO-1) the optimizer moments of parameters the rules
  replicate go over `data` along their first axis when it divides.
  """
  def spec_for(path, leaf) -> P:
    names = param_logical_axes(path, leaf)
    if names is None:
      return P()
    spec = logical_spec(names, rules)
    for size, name, axes in zip(leaf.shape, names, spec):
      parts = 1 if axes is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]))
      if size % parts:
        raise LayoutError(f"sharding.{name}={','.join(np.atleast_1d(axes))!s}: "
                          f"{jax.tree_util.keystr(path)} has {size} along '{name}', not "
                          f"divisible by {parts} devices")
    return spec

  def for_params(path, leaf):
    return NamedSharding(mesh, spec_for(path, leaf))

  def for_optimizer(path, leaf):
    spec = spec_for(path, leaf)
    if (shard_optimizer_over_data and all(a is None for a in spec)
        and getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] % mesh.shape["data"] == 0):
      spec = P("data")
    return NamedSharding(mesh, spec)

  with_path = jax.tree_util.tree_map_with_path
  return type(state)(NamedSharding(mesh, P()), with_path(for_params, state.params),
                     with_path(for_params, state.biases), with_path(for_optimizer, state.opt_state))
