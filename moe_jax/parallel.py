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


def state_shardings(tree, mesh: Mesh, shard_experts: bool):
  """A NamedSharding per leaf: routed-expert weights [E, ...] over `expert`, the rest replicated.

  Optimizer states mirror the parameter paths, so their moments follow their parameters.
  """
  def sharding(path, leaf):
    names = _names(path)
    if shard_experts and getattr(leaf, "ndim", 0) == 3 and any(n in EXPERT_WEIGHTS for n in names):
      return NamedSharding(mesh, P("expert"))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(sharding, tree)
