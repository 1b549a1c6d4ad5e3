"""Parameters that carry the logical names of their dimensions from where they are created.

A name says what a dimension is ("embed", "heads", "experts", ...); the config's `sharding`
rules map names to mesh axes (moe_jax/parallel.py). None marks a dimension no rule shards
(the single output of a gate). Optimizer moments made from a parameter keep its names.
"""

import jax
from flax import nnx

LOGICAL_AXES_KEY = "logical_axes"


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """An `nnx.Param` of `value` whose dimensions are called `names`, one per dimension."""
  return named(nnx.Param, value, *names)


def named(kind: type[nnx.Variable], value: jax.Array, *names: str | None) -> nnx.Variable:
  """A variable of `kind` (a parameter, the balancing bias) whose dimensions carry `names`."""
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} logical names {names} for an array of shape {value.shape}")
  return kind(value, **{LOGICAL_AXES_KEY: tuple(names)})


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical names `variable` was created with (None: created without)."""
  return variable.get_metadata().get(LOGICAL_AXES_KEY)
