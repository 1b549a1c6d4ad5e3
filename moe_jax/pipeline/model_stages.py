"""A model's scanned MoE blocks as pipeline stages: the stage function and its parameters.

`moe_stages(model, block_counts, seq_len, balancing)` splits a scanned model's MoE block
stack (L blocks, every variable with a leading layer axis) into stages of consecutive blocks,
`block_counts[s]` in stage s, and returns `(stage_fn, stage_state)` for
`scheduled.scheduled(..., has_aux=True)`: `stage_state` is the stack's state with leading axes
[S, K] (`as_stages`; K the largest count), and `stage_fn(state, x) -> (x, (aux_loss, stats))`
runs one stage's blocks by a scan, with their auxiliary losses weighted by `balancing`
(routing.BalancingValues) and summed as the training loss sums them (`steps.loss_fn`), and
each block's routing statistics (`MoEStats` with a leading [K] axis: the expert counts for the
balancing-bias update, and the rest for the metrics). In an uneven split a stage of fewer than
K blocks is padded with copies of its last block that `lax.cond` skips (their statistics
zeros, their gradients zeros); `Layout.blocks` takes the real blocks' rows back out.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.manual_axes import typed_like
from moe_jax.pipeline.schedules import ScheduleError
from moe_jax.routing import BalancingValues


class Layout(NamedTuple):
  """Where each stage's blocks sit in the stack: `index` [S, K] (a block of the stack per row,
  padding repeating the stage's last block) and `real` [S, K] (False on padding)."""

  index: np.ndarray
  real: np.ndarray

  @property
  def padded(self) -> bool:
    return not self.real.all()

  def blocks(self, per_stage):
    """[S, K, ...] -> [L, ...]: the real blocks' rows, in stack order."""
    rows = np.flatnonzero(self.real.reshape(-1))
    return per_stage.reshape(-1, *per_stage.shape[2:])[rows]


def layout(block_counts: tuple[int, ...]) -> Layout:
  """Stage s holds blocks sum(counts[:s]) .. sum(counts[:s + 1]) - 1."""
  width = max(block_counts)
  starts = np.cumsum((0,) + tuple(block_counts[:-1]))
  slot = np.arange(width)[None, :]
  counts = np.asarray(block_counts)[:, None]
  return Layout(starts[:, None] + np.minimum(slot, counts - 1), slot < counts)


def moe_stack(model, block_counts: tuple[int, ...]):
  """The model's MoE block stack, refused by name where it cannot be split into the stages."""
  stack = getattr(model, "moe_blocks", None)
  if stack is None:
    raise ScheduleError("pipeline stages need the model's MoE blocks as a stack: set "
                        "model.scan_layers=True, with at least one MoE block")
  if sum(block_counts) != stack.count or min(block_counts) < 1:
    raise ScheduleError(f"{stack.count} MoE blocks do not split into stages of "
                        f"{list(block_counts)} blocks")
  return stack


def as_stages(state, stages: Layout):
  """A stack's state [L, ...] as [S, K, ...] by `stages`; padded, with `real` [S, K] (float:
  every stage leaf is differentiated) beside it: `(state, real)`."""
  stacked = jax.tree.map(lambda a: a[stages.index], state)
  return (stacked, jnp.asarray(stages.real, jnp.float32)) if stages.padded else stacked


def stage_function(graphdef, seq_len: int, balancing: BalancingValues, padded: bool = False):
  """(stage state [K, ...], x) -> (x, (aux_loss, stats)) for blocks of `graphdef`, the
  blocks' auxiliary losses weighted by `balancing`; `padded`: the state is `(blocks, real
  [K])` and blocks with `real` 0 are skipped."""
  positions = jnp.arange(seq_len)

  def run(layer_state, x):
    return nnx.merge(graphdef, layer_state)(x, positions)

  def stage_fn(state, x):
    if padded:
      blocks, real = state

      def block(x, inputs):
        layer_state, is_real = inputs

        # Both branches' statistics typed as x is (inside a shard_map: varying along its manual
        # axes; a statistic may be a constant), the skipped block's zeros made without a
        # collective: only the devices of this stage take that branch.
        def real_block(x):
          y, stats = run(layer_state, x)
          return y, jax.tree.map(lambda s: typed_like(s, x), stats)

        def skip(x):
          return x, jax.tree.map(lambda s: typed_like(jnp.zeros(s.shape, s.dtype), x),
                                 jax.eval_shape(run, layer_state, x)[1])

        return jax.lax.cond(is_real > 0, real_block, skip, x)

      x, stats = jax.lax.scan(block, x, (blocks, real))
    else:
      x, stats = jax.lax.scan(lambda x, layer_state: run(layer_state, x), x, state)
    return x, (balancing.aux_loss(stats), stats)

  return stage_fn


def moe_stages(model, block_counts: tuple[int, ...], seq_len: int, balancing: BalancingValues):
  """(stage_fn, stage_state) of `model`'s MoE blocks split into stages of `block_counts`."""
  graphdef, state = nnx.split(moe_stack(model, block_counts).layers)
  stages = layout(block_counts)
  return stage_function(graphdef, seq_len, balancing, stages.padded), as_stages(state, stages)
