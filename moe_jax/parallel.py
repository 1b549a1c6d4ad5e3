"""The device mesh and where arrays live on it.

Mesh axes: `data` and `expert`. The batch is split over both. Routed-expert weights (and
their optimizer state) are split over `expert` when expert parallelism is on; every other
parameter is replicated.
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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows of the batch -> one global array split over the token axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _is_expert_weight(path, leaf) -> bool:
  return getattr(leaf, "ndim", 0) == 3 and any(n in EXPERT_WEIGHTS for n in _names(path))


def state_shardings(state, mesh: Mesh, shard_experts: bool, shard_optimizer_over_data: bool = False):
  """A NamedSharding per leaf of a TrainState.

  Routed-expert weights [E, ...] and their optimizer moments go over `expert` when
  `shard_experts`; with `shard_optimizer_over_data` (ZeRO-1) the optimizer moments of every
  other parameter go over `data` along their first axis when it divides; the rest is
  replicated. Optimizer states mirror the parameter paths, so moments follow their parameters.
  """
  data_size = mesh.shape["data"]

  def for_params(path, leaf):
    if shard_experts and _is_expert_weight(path, leaf):
      return NamedSharding(mesh, P("expert"))
    return NamedSharding(mesh, P())

  def for_optimizer(path, leaf):
    if shard_experts and _is_expert_weight(path, leaf):
      return NamedSharding(mesh, P("expert"))
    if (shard_optimizer_over_data and getattr(leaf, "ndim", 0) >= 1
        and leaf.shape[0] % data_size == 0):
      return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())

  with_path = jax.tree_util.tree_map_with_path
  return type(state)(NamedSharding(mesh, P()), with_path(for_params, state.params),
                     with_path(for_params, state.biases), with_path(for_optimizer, state.opt_state))
