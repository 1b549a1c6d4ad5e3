"""GPipe over a mesh axis: stages on devices, micro-batches passed along with `ppermute`.

`gpipe(stage_fn, axis)` turns `stage_fn(params, x) -> y` (one stage: a slice of the model's
layers, the same shapes in and out) into a function of all stages' parameters, stacked along a
leading axis split over the mesh axis `axis` (one stage per device), and a batch of
micro-batches. Inside `jax.shard_map` each device runs its stage once per tick for M + S - 1
ticks: stage 0 takes micro-batch t, every other stage what its predecessor produced at the
tick before (a `ppermute` along the axis), and the last stage keeps micro-batch t - S + 1's
output. Reverse-mode differentiation of the ticks gives the backward in the reverse order (the
`ppermute`s transpose into the opposite direction): GPipe's schedule, whose bubble is
(S - 1) / (M + S - 1) of each device's time (`schedules.gpipe`). Devices compute in the
bubble ticks too, on zeros: SPMD runs one program everywhere.

Shape letters: S stages, M micro-batches, B micro-batch rows (per data shard), D width.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.manual_axes import varying_along


def gpipe(stage_fn, axis: str = "stage", batch_axes=None):
  """f(stage_params [S, ...], microbatches [M, B, ...]) -> outputs [M, B, ...] over the context
  mesh (`jax.set_mesh`): parameters split over `axis`, micro-batch rows over `batch_axes`
  (e.g. "data"), outputs as the micro-batches."""
  batch = P(None, batch_axes)

  def run(stage_params, microbatches):
    per_device = functools.partial(_ticks, stage_fn, axis)
    return jax.shard_map(per_device, in_specs=(P(axis), batch), out_specs=batch)(
        stage_params, microbatches)
  return run


def _ticks(stage_fn, axis, stage_params, microbatches):
  num_stages = jax.lax.axis_size(axis)
  num_microbatches = microbatches.shape[0]
  stage = jax.lax.axis_index(axis)
  params = jax.tree.map(lambda p: p[0], stage_params)      # this device's stage
  forward_to_next = [(i, (i + 1) % num_stages) for i in range(num_stages)]
  first, last = stage == 0, stage == num_stages - 1

  def tick(carry, t):
    received, outputs = carry
    fresh = jax.lax.dynamic_index_in_dim(microbatches, jnp.minimum(t, num_microbatches - 1),
                                         keepdims=False)
    out = stage_fn(params, jnp.where(first, fresh, received))
    done = t - (num_stages - 1)                             # the micro-batch leaving the pipe
    keep = last & (done >= 0)
    slot = jnp.clip(done, 0, num_microbatches - 1)
    current = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, jnp.where(keep, out, current), slot, 0)
    return (jax.lax.ppermute(out, axis, forward_to_next), outputs), None

  # The carry differs from stage to stage: declared so from the start (shard_map's type check).
  varying = varying_along((axis,))
  start = (varying(jnp.zeros_like(microbatches[0])), varying(jnp.zeros_like(microbatches)))
  (_, outputs), _ = jax.lax.scan(tick, start, jnp.arange(num_microbatches + num_stages - 1))
  # Only the last stage holds the outputs: share them along the axis.
  return jax.lax.psum(jnp.where(last, outputs, 0), axis)
