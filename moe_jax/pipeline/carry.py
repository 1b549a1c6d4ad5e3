"""Loop carries inside `jax.shard_map` typed as differing from device to device."""

import jax


def varying_along(axes: tuple[str, ...]):
  """x -> x typed as differing along every one of `axes`: shard_map checks that a loop's carry
  keeps its type, and a pipeline's carries come to differ along the stage axis (and the data
  axes). Adds a zero that differs along each axis, so it serves values that already differ
  along some of them too (`jax.lax.pcast` refuses those)."""
  zero = sum(jax.lax.axis_index(a) for a in axes) * 0
  return lambda x: x + zero.astype(x.dtype)
