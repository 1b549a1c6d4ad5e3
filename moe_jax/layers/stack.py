"""Layers stacked for a scan: L modules of one structure held as one module whose every
variable has a leading "layers" dimension, run by `jax.lax.scan`, so that XLA compiles one
layer instead of L (compile time of deep models: docs/performance.md).

A stack is made from L built modules (the same random draws, in the same order, as the
unstacked model), and the layout converts both ways (`stacked_paths`, `unstacked_paths`):
a checkpoint, a Hugging Face import and a decoding cache can each use the layout it needs.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.params import LOGICAL_AXES_KEY

LAYERS = "layers"   # the logical name of a stack's leading dimension


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stacked(*variables: nnx.Variable) -> nnx.Variable:
  """One variable holding `variables` (one per layer) along a new leading "layers" axis."""
  metadata = dict(variables[0].get_metadata())
  if LOGICAL_AXES_KEY in metadata:
    metadata[LOGICAL_AXES_KEY] = (LAYERS, *metadata[LOGICAL_AXES_KEY])
  return type(variables[0])(jnp.stack([v[...] for v in variables]), **metadata)


class LayerStack(nnx.Module):
  """`count` layers of one structure, applied in order by a scan."""

  def __init__(self, layers: list[nnx.Module]):
    graphdefs, states = zip(*(nnx.split(layer) for layer in layers))
    if any(g != graphdefs[0] for g in graphdefs):
      raise ValueError("a LayerStack holds layers of one structure")
    self.layers = nnx.merge(graphdefs[0],
                            jax.tree.map(_stacked, *states, is_leaf=_is_variable))
    self.count = len(layers)

  def __call__(self, x, *args, policy=None):
    """x through every layer in order, each called as `layer(x, *args) -> (x, extra)`:
    (x, the layers' extras stacked along a leading layer axis). With a `jax.checkpoint`
    `policy`, each layer's backward pass keeps only what the policy saves."""
    graphdef, state = nnx.split(self.layers)

    def step(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, *args)

    if policy is not None:
      step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, x, state)


def unstacked_paths(flat: dict[tuple, jax.Array], stacks: dict[str, tuple[str, int]]) -> dict:
  """{path: array} of a model with stacks -> the same arrays one layer each. `stacks` maps a
  stack's attribute name to (the list attribute, index of its first layer):
  ("moe_blocks", "layers", *rest) [L, ...] -> ("blocks", first + j, *rest) [...]."""
  out = {}
  for path, value in flat.items():
    if path[0] in stacks:
      name, first = stacks[path[0]]
      for j in range(value.shape[0]):
        out[(name, first + j, *path[2:])] = value[j]
    else:
      out[path] = value
  return out


def stacked_paths(flat: dict[tuple, jax.Array], stacks: dict[str, tuple[str, int, int]]) -> dict:
  """The inverse of `unstacked_paths`: `stacks` maps a stack's name to (the list attribute,
  index of its first layer, number of layers)."""
  out, taken = {}, set()
  for stack, (name, first, count) in stacks.items():
    rests = {path[2:] for path in flat if path[0] == name and first <= path[1] < first + count}
    for rest in rests:
      layers = [(name, first + j, *rest) for j in range(count)]
      out[(stack, "layers", *rest)] = jnp.stack([flat[p] for p in layers])
      taken.update(layers)
  out.update({path: value for path, value in flat.items() if path not in taken})
  return out
