"""A training step's pipeline run from a schedule's slot lists: each stage's backward called
explicitly, so the order is the schedule's (1F1B, GPipe), not the one differentiation gives.

`scheduled(name, stage_fn, loss_fn, axis, batch_axes)` returns
f(stage_params [S, ...], microbatches [M, B, ...], targets [M, B, ...]) -> (loss, grads [S, ...]):
the summed loss of every micro-batch (`loss_fn(last stage's output, targets)`) and its gradient
with respect to every stage's parameters. Inside `jax.shard_map` the schedule is played in
ticks, one operation per device per tick (`tick_table`): a forward applies the stage to the
input (the micro-batch on stage 0, else what the previous stage sent) and keeps that input; a
backward recomputes the stage's forward from the kept input under `jax.vjp` (activation
recomputation per stage), takes the output gradient (from the loss on the last stage, else what
the next stage sent), adds the parameter gradient and sends the input gradient back. After each
tick every device sends what it produced one stage on (`ppermute`) and files what it received
by micro-batch, for the tick that needs it.

Shape letters: S stages, M micro-batches, B micro-batch rows (per data shard), T ticks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax.pipeline import schedules

IDLE, FORWARD, BACKWARD = 0, 1, 2
RUNNABLE = ("gpipe", "1f1b")


def tick_table(schedule: schedules.Schedule) -> tuple[np.ndarray, np.ndarray]:
  """(kind [S, T], micro-batch [S, T]): what each device does at each tick, one operation per
  tick, at the times `simulate` gives when every operation takes one tick."""
  timeline = schedules.simulate(schedule, schedules.Costs(1.0, 1.0, 0.0))
  ticks = int(timeline.makespan)
  kinds = np.full((len(schedule.slots), ticks), IDLE, np.int32)
  microbatches = np.zeros((len(schedule.slots), ticks), np.int32)
  for device, slots in enumerate(schedule.slots):
    for (op,), start in zip(slots, timeline.starts[device]):
      kinds[device, int(start)] = FORWARD if op.kind == "F" else BACKWARD
      microbatches[device, int(start)] = op.microbatch
  return kinds, microbatches


def scheduled(name: str, stage_fn, loss_fn, axis: str = "stage", batch_axes=None):
  """The loss and parameter gradients of the stages in sequence, run by schedule `name`."""
  if name not in RUNNABLE:
    raise schedules.ScheduleError(f"pipeline schedule {name!r} cannot be run yet; runnable: "
                                  f"{list(RUNNABLE)}")
  batch = P(None, batch_axes)

  def run(stage_params, microbatches, targets):
    num_stages = jax.tree.leaves(stage_params)[0].shape[0]
    kinds, indices = tick_table(schedules.make(name, num_stages, microbatches.shape[0]))
    per_device = functools.partial(_play, stage_fn, loss_fn, axis, batch_axes, kinds, indices)
    return jax.shard_map(per_device, in_specs=(P(axis), batch, batch),
                         out_specs=(P(), P(axis)))(stage_params, microbatches, targets)
  return run


def _play(stage_fn, loss_fn, axis, batch_axes, kinds, indices, stage_params, microbatches,
          targets):
  num_stages = jax.lax.axis_size(axis)
  stage = jax.lax.axis_index(axis)
  first, last = stage == 0, stage == num_stages - 1
  params = jax.tree.map(lambda p: p[0], stage_params)      # this device's stage
  my_kinds, my_indices = jnp.asarray(kinds)[stage], jnp.asarray(indices)[stage]
  to_next = [(i, (i + 1) % num_stages) for i in range(num_stages)]
  to_previous = [((i + 1) % num_stages, i) for i in range(num_stages)]
  all_axes = (axis,) + (() if batch_axes is None else
                        (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
  # Loop carries differ from device to device along every axis: typed so from the start
  # (shard_map checks that a loop's carry keeps its type), with a zero that does.
  differing_zero = sum(jax.lax.axis_index(a) for a in all_axes) * 0
  varying = lambda x: x + differing_zero.astype(x.dtype)
  # Each data shard's own parameter gradient (summed over the shards at the end): without this
  # the pullback of parameters shared by the shards would sum them already.
  params = jax.tree.map(varying, params)
  nothing = varying(jnp.zeros_like(microbatches[0]))
  at = lambda buffer, i: jax.lax.dynamic_index_in_dim(buffer, i, keepdims=False)
  put = lambda buffer, i, value: jax.lax.dynamic_update_index_in_dim(buffer, value, i, 0)

  def forward(state, microbatch):
    inputs, _, kept, grads, loss = state
    x = jnp.where(first, at(microbatches, microbatch), at(inputs, microbatch))
    return (put(kept, microbatch, x), grads, loss), (stage_fn(params, x), nothing)

  def backward(state, microbatch):
    _, gradients, kept, grads, loss = state
    out, pullback = jax.vjp(stage_fn, params, at(kept, microbatch))
    value, loss_grad = jax.value_and_grad(loss_fn)(out, at(targets, microbatch))
    grad_out = jnp.where(last, loss_grad, at(gradients, microbatch))
    grad_params, grad_x = pullback(grad_out)
    grads = jax.tree.map(jnp.add, grads, grad_params)
    return (kept, grads, loss + jnp.where(last, value, 0.0)), (nothing, grad_x)

  def idle(state, microbatch):
    _, _, kept, grads, loss = state
    return (kept, grads, loss), (nothing, nothing)

  def tick(carry, t):
    inputs, gradients, kept, grads, loss = carry
    kind, microbatch = my_kinds[t], my_indices[t]
    (kept, grads, loss), (sent_forward, sent_backward) = jax.lax.switch(
        kind, [idle, forward, backward], carry, microbatch)
    # What was sent is filed by the sender's micro-batch, if it sent anything.
    sent = (sent_forward, sent_backward, kind, microbatch)
    arrived_forward, _, forward_kind, forward_index = jax.lax.ppermute(sent, axis, to_next)
    _, arrived_backward, backward_kind, backward_index = jax.lax.ppermute(sent, axis, to_previous)
    inputs = jnp.where(forward_kind == FORWARD,
                       put(inputs, forward_index, arrived_forward), inputs)
    gradients = jnp.where(backward_kind == BACKWARD,
                          put(gradients, backward_index, arrived_backward), gradients)
    return (inputs, gradients, kept, grads, loss), None

  buffers = varying(jnp.zeros_like(microbatches))
  start = (buffers, buffers, buffers, jax.tree.map(lambda p: varying(jnp.zeros_like(p)), params),
           varying(jnp.zeros((), jnp.float32)))
  (_, _, _, grads, loss), _ = jax.lax.scan(tick, start, jnp.arange(kinds.shape[1]))
  loss = jax.lax.psum(loss, axis)
  if batch_axes is not None:
    loss, grads = jax.lax.psum((loss, grads), batch_axes)
  return loss, jax.tree.map(lambda g: g[None], grads)
