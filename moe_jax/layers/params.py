"""Parameters that carry the logical names of their dimensions from where they are created.

A name says what a dimension is ("embed", "heads", "experts", ...); the config's `sharding`
rules map names to mesh axes (moe_jax/parallel.py). None marks a dimension no rule shards
(the single output of a gate). Optimizer moments made from a parameter keep its names.
"""

import jax
from flax import nnx

LOGICAL_AXES_KEY = "logical_axes"


class ParamKeys:
  """The keys of `nnx.Rngs(params=seed).params()`: the n-th call gives `fold_in(key(seed), n)`,
  so a model built with either has the same parameters. The count here is a Python int.
  nnx.Rngs keeps it in an array, and each draw inside a trace (jit, eval_shape) then walks the
  whole trace so far: flax 0.12's variable update asks the traced count for its sharding, and
  jax writes an error message that finds where the value came from. Building a model inside a
  trace was quadratic in its number of parameters (eval_shape of the V3 preset: 14 s, now
  under 1 s)."""

  def __init__(self, seed: int):
    self._key = jax.random.key(seed)
    self._count = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key


KeySource = nnx.Rngs | ParamKeys   # what layers draw their initial values' keys from


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
