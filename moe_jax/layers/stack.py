"""Layers stacked for a scan: L modules of one structure held as one module whose every
variable has a leading "layers" dimension, run by `jax.lax.scan`, so that XLA compiles one
layer instead of L (compile time of deep models: docs/performance.md).

A stack is made from L built modules (the same random draws, in the same order, as the
unstacked model), and the layout converts both ways, for a model's state or a whole training
state, arrays or abstract ones (`converted_state`, `converted_tree`): a checkpoint, a Hugging
Face import and a decoding cache can each use the layout it needs.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.layers.params import LOGICAL_AXES_KEY

LAYERS = "layers"   # the logical name of a stack's leading dimension


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stack_values(values: list):
  """Arrays stacked along a new leading axis; ShapeDtypeStructs (with a NamedSharding) get the
  stacked shape, the new axis unsplit."""
  first = values[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding and NamedSharding(first.sharding.mesh,
                                                P(None, *first.sharding.spec))
    return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype, sharding=sharding)
  return jnp.stack(values)


def _layer_value(value, j: int):
  """Layer j of a stacked array, or the shape of one layer of a stacked ShapeDtypeStruct."""
  if isinstance(value, jax.ShapeDtypeStruct):
    sharding = value.sharding and NamedSharding(value.sharding.mesh,
                                                P(*value.sharding.spec[1:]))
    return jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=sharding)
  return value[j]


def _stacked(*variables: nnx.Variable) -> nnx.Variable:
  """One variable holding `variables` (one per layer) along a new leading "layers" axis."""
  metadata = dict(variables[0].get_metadata())
  if LOGICAL_AXES_KEY in metadata:
    metadata[LOGICAL_AXES_KEY] = (LAYERS, *metadata[LOGICAL_AXES_KEY])
  return type(variables[0])(_stack_values([v.get_value() for v in variables]), **metadata)


def _layer(variable: nnx.Variable, j: int) -> nnx.Variable:
  """Layer j of a stacked variable, its names without the leading "layers"."""
  metadata = dict(variable.get_metadata())
  if LOGICAL_AXES_KEY in metadata:
    metadata[LOGICAL_AXES_KEY] = metadata[LOGICAL_AXES_KEY][1:]
  return type(variable)(_layer_value(variable.get_value(), j), **metadata)


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


def unstacked_paths(flat: dict[tuple, nnx.Variable], stacks: dict[str, tuple[str, int]]) -> dict:
  """{path: variable} of a model with stacks -> the same values one layer each. `stacks` maps
  a stack's attribute name to (the list attribute, index of its first layer):
  ("moe_blocks", "layers", *rest) [L, ...] -> ("blocks", first + j, *rest) [...]."""
  out = {}
  for path, variable in flat.items():
    if path[0] in stacks:
      name, first = stacks[path[0]]
      for j in range(variable.shape[0]):
        out[(name, first + j, *path[2:])] = _layer(variable, j)
    else:
      out[path] = variable
  return out


def stacked_paths(flat: dict[tuple, nnx.Variable],
                  stacks: dict[str, tuple[str, int, int]]) -> dict:
  """The inverse of `unstacked_paths`: `stacks` maps a stack's name to (the list attribute,
  index of its first layer, number of layers)."""
  out, taken = {}, set()
  for stack, (name, first, count) in stacks.items():
    rests = {path[2:] for path in flat if path[0] == name and first <= path[1] < first + count}
    for rest in rests:
      layers = [(name, first + j, *rest) for j in range(count)]
      out[(stack, "layers", *rest)] = _stacked(*(flat[p] for p in layers))
      taken.update(layers)
  out.update({path: value for path, value in flat.items() if path not in taken})
  return out


def converted_state(state: nnx.State, scanned: bool, num_layers: int,
                    num_dense: int) -> nnx.State:
  """A Transformer's state (or a tree laid out like its parameters: optimizer moments), of
  arrays or of ShapeDtypeStructs with shardings, with its blocks as stacks (`scanned`:
  "dense_blocks" and "moe_blocks") or as the list "blocks"."""
  flat = dict(nnx.to_flat_state(state))
  if scanned:
    flat = stacked_paths(flat, {"dense_blocks": ("blocks", 0, num_dense),
                                "moe_blocks": ("blocks", num_dense, num_layers - num_dense)})
  else:
    flat = unstacked_paths(flat, {"dense_blocks": ("blocks", 0),
                                  "moe_blocks": ("blocks", num_dense)})
  return nnx.from_flat_state(flat)


def converted_tree(tree, scanned: bool, num_layers: int, num_dense: int):
  """`tree` (a training state: parameters, biases, optimizer state) with every nnx.State in it
  converted by `converted_state`; other leaves (counters) as they are."""
  convert = lambda x: (converted_state(x, scanned, num_layers, num_dense)
                       if isinstance(x, nnx.State) else x)
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, nnx.State))
