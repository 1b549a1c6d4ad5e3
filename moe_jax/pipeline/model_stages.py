"""A model's scanned MoE blocks as pipeline stages: the stage function and its parameters.

`moe_stages(model, num_stages, seq_len)` splits a scanned model's MoE block stack (L blocks,
every variable with a leading layer axis) into `num_stages` stages of L / S consecutive blocks
and returns `(stage_fn, stage_state)` for `scheduled.scheduled(..., has_aux=True)`:
`stage_state` is the stack's state with leading axes [S, L / S] (`as_stages`), and
`stage_fn(state, x) -> (x, (aux_loss, stats))` runs one stage's blocks by a scan, with their
auxiliary losses summed as the training loss sums them (`steps.loss_fn`) and each block's
routing statistics (`MoEStats` with a leading [L / S] axis: the expert counts for the
balancing-bias update, and the rest for the metrics).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.pipeline.schedules import ScheduleError


def moe_stack(model, num_stages: int):
  """The model's MoE block stack, refused by name where it cannot be split into the stages."""
  stack = getattr(model, "moe_blocks", None)
  if stack is None:
    raise ScheduleError("pipeline stages need the model's MoE blocks as a stack: set "
                        "model.scan_layers=True, with at least one MoE block")
  if stack.count % num_stages:
    raise ScheduleError(f"{stack.count} MoE blocks do not split into {num_stages} stages")
  return stack


def as_stages(state, num_stages: int):
  """A stack's state [L, ...] as [S, L / S, ...]: stage s holds blocks s L/S .. (s+1) L/S - 1."""
  return jax.tree.map(lambda a: a.reshape(num_stages, a.shape[0] // num_stages, *a.shape[1:]),
                      state)


def stage_function(graphdef, seq_len: int):
  """(stage state [L / S, ...], x) -> (x, (aux_loss, stats)) for blocks of `graphdef`."""
  positions = jnp.arange(seq_len)

  def stage_fn(state, x):
    def block(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, positions)
    x, stats = jax.lax.scan(block, x, state)
    aux_loss = jnp.sum(stats.switch_loss + stats.sequence_loss + stats.z_loss)
    return x, (aux_loss, stats)

  return stage_fn


def moe_stages(model, num_stages: int, seq_len: int):
  """(stage_fn, stage_state) of `model`'s MoE blocks split into `num_stages` stages."""
  graphdef, state = nnx.split(moe_stack(model, num_stages).layers)
  return stage_function(graphdef, seq_len), as_stages(state, num_stages)
