"""The device mesh and where arrays live on it.

Mesh axes: `data` and `expert`. In this version every parameter is replicated and the batch is
split over both axes (each device routes its own sequences); expert-sharded weights come with
the expert-parallel dispatchers.
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
