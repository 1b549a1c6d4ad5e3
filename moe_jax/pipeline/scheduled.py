"""A training step's pipeline run from a schedule's slot lists: each stage's backward called
explicitly, so the order is the schedule's (GPipe, 1F1B, DualPipeV), not the one
differentiation gives.

`scheduled(name, stage_fn, loss_fn, axis, batch_axes, has_aux)` returns
f(stage_params [S, ...], microbatches [M, B, ...], targets [M, B, ...], loss_params) -> `Result`:
the summed loss of every micro-batch (`loss_fn(loss_params, last stage's output, targets)`) and
its gradient with respect to every stage's parameters (in stage order), to the micro-batches
(for what runs before the pipeline, e.g. the embedding) and to `loss_params` (what runs after
it on the last stage, e.g. the output head; any pytree, None for none). With `has_aux`,
`stage_fn(params, x)` returns `(y, (aux_loss, stats))`, as an MoE stage does: each stage's
auxiliary loss (its balancing losses) joins the loss and its gradient, and its statistics
(expert counts) are summed over micro-batches and data shards, per stage. With
`loss_has_aux`, `loss_fn` returns `(loss, stats)` (an MTP head's losses and routing
statistics), its statistics summed over micro-batches. Inside `jax.shard_map`, manual over
`axis` and `batch_axes` (None: the other mesh axes stay automatic, so a stage sees the whole
micro-batch, split over them by the compiler, and its batch statistics are the whole
micro-batch's), the schedule is played in lockstep ticks, each running on every device at most
one forward and then one backward operation (`tick_table`: 1F1B's steady state and DualPipeV's
overlapped pairs are one tick each, every device busy). Each device holds its
stages as chunks (one, or two for DualPipeV's V), with per chunk a buffer of inputs, of output
gradients and of kept inputs, by micro-batch:

  F   applies the chunk's stage to its input (the micro-batch on stage 0) and keeps the input
  BW  recomputes the forward from the kept input under `jax.vjp`, takes the output gradient
      (the loss's on the last stage), adds the parameter gradient, sends the input gradient
  B   the same, but only the input gradient: the output gradient is kept for ...
  W   ... the parameter gradient, later (zero-bubble schedules)

A result goes to the device holding the next stage (forward) or the previous one (backward):
the next or previous device along `axis` through `ppermute`, or the same device where the V
turns; the receiver files it by micro-batch for the tick that needs it. Each backward
recomputes its stage's forward, and the buffers hold every micro-batch (a schedule needs fewer:
`schedules.peak_activations`): time and memory a real model will want back.

Shape letters: S stages, C stages per device (chunks), D devices, M micro-batches, B
micro-batch rows (per data shard), T ticks.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax.manual_axes import varying_along
from moe_jax.pipeline import schedules

IDLE, FORWARD, FULL_BACKWARD, INPUT_GRADIENT, WEIGHT_GRADIENT = range(5)
KINDS = {"F": FORWARD, "BW": FULL_BACKWARD, "B": INPUT_GRADIENT, "W": WEIGHT_GRADIENT}
NOWHERE, NEXT_DEVICE, PREVIOUS_DEVICE, SAME_DEVICE = range(4)   # where a result goes
INPUTS, GRADIENTS = 0, 1                                           # which buffer it fills


class Result(NamedTuple):
  loss: jax.Array            # summed over micro-batches (and the stages' auxiliary losses)
  grads: object              # like the stage parameters: [S, ...]
  input_grads: jax.Array     # like the micro-batches: [M, B, ...]
  stats: object              # with has_aux: each stage's statistics, summed: [S, ...]
  loss_grads: object         # like loss_params
  loss_stats: object         # with loss_has_aux: the loss's statistics, summed


class TickTable(NamedTuple):
  """Per device, tick and lane ([D, T, 2] each): the operation, its chunk and micro-batch, and
  where its result goes (direction, the receiving chunk, the buffer). Lane 0 holds forwards,
  lane 1 backward operations (BW, B or W); in a tick lane 0 runs first."""

  kind: np.ndarray
  chunk: np.ndarray
  microbatch: np.ndarray
  direction: np.ndarray
  to_chunk: np.ndarray
  to_buffer: np.ndarray


FORWARD_LANE, BACKWARD_LANE = 0, 1


def tick_table(schedule: schedules.Schedule) -> TickTable:
  """Each device's operations in the schedule's order, each in the earliest tick its inputs
  allow, a tick holding at most one forward and one backward operation per device.

  The devices run in lockstep (the ticks' `ppermute`s join them), so a tick lasts as long as
  its slowest device: a tick of one forward and one backward on every device, as 1F1B's steady
  state and DualPipeV's overlapped pairs give, keeps every device busy. An input sent by
  another device, or by the same device across the V's turn, arrives at the end of its tick;
  a backward may share the tick of its own stage's forward (lane 0 runs first), a weight
  gradient follows its input gradient's tick."""
  num_devices, last_stage = schedule.num_devices, schedule.num_stages - 1
  holder = {stage: (device, chunk) for device, stages in enumerate(schedule.stages_of_device)
            for chunk, stage in enumerate(stages)}
  ops = [[op for slot in slots for op in slot] for slots in schedule.slots]
  done: dict[tuple[str, int, int], int] = {}   # ("F" | "backward" | "B", stage, mb) -> tick
  placed: list[list[tuple[int, int, schedules.Op]]] = [[] for _ in range(num_devices)]
  position, clock = [0] * num_devices, [0] * num_devices
  taken: set[tuple[int, int, int]] = set()     # (device, tick, lane)

  def earliest(op: schedules.Op) -> int | None:
    """The first tick whose start sees every input of `op`, None while one is not placed: a
    tick after each input's, but the tick of its own stage's forward for a backward."""
    needs = schedules.inputs(op, last_stage)
    ticks = [done.get((need.kind, need.stage, need.microbatch)) for need in needs]
    if any(t is None for t in ticks):
      return None
    own_forward = lambda need: need.kind == "F" and need.stage == op.stage
    return max([t + (0 if own_forward(need) else 1) for t, need in zip(ticks, needs)],
               default=0)

  remaining = sum(map(len, ops))
  while remaining:
    progressed = False
    for device in range(num_devices):
      while position[device] < len(ops[device]):
        op = ops[device][position[device]]
        start = earliest(op)
        if start is None:
          break
        lane = FORWARD_LANE if op.kind == "F" else BACKWARD_LANE
        t = max(start, clock[device])
        while (device, t, lane) in taken:
          t += 1
        taken.add((device, t, lane))
        done[(op.kind, op.stage, op.microbatch)] = t
        if op.kind in ("B", "BW"):
          done[("backward", op.stage, op.microbatch)] = t
        placed[device].append((t, lane, op))
        clock[device], position[device] = t, position[device] + 1
        remaining, progressed = remaining - 1, True
    if not progressed:
      raise schedules.ScheduleError(f"{schedule.name}: deadlock in the tick table")
  ticks = 1 + max(t for device in placed for t, _, _ in device)
  table = TickTable(*(np.zeros((num_devices, ticks, 2), np.int32) for _ in range(6)))
  for device, device_ops in enumerate(placed):
    for t, lane, op in device_ops:
      table.kind[device, t, lane] = KINDS[op.kind]
      table.chunk[device, t, lane] = schedule.stages_of_device[device].index(op.stage)
      table.microbatch[device, t, lane] = op.microbatch
      target = (op.stage + 1 if op.kind == "F" else
                op.stage - 1 if op.kind in ("BW", "B") else None)
      if target is None or target < 0 or target > last_stage:
        continue   # a weight gradient, the last forward or the first backward: nothing to send
      to_device, to_chunk = holder[target]
      step = to_device - device
      table.direction[device, t, lane] = {1: NEXT_DEVICE, -1: PREVIOUS_DEVICE,
                                          0: SAME_DEVICE}[step]
      table.to_chunk[device, t, lane] = to_chunk
      table.to_buffer[device, t, lane] = INPUTS if op.kind == "F" else GRADIENTS
  return table


def lockstep_bubble(table: TickTable, costs: schedules.Costs = schedules.Costs()) -> float:
  """The idle share of device time when the ticks run in lockstep, each as long as its slowest
  device's operations (`costs` per kind): what the tick table adds to the schedule's own
  bubble (`schedules.simulate`)."""
  cost = np.zeros(len(KINDS) + 1)                  # by operation code; IDLE costs nothing
  for kind, code in KINDS.items():
    cost[code] = costs.of_kind(kind)
  busy = cost[table.kind].sum(axis=2)              # [D, T]
  makespan = busy.max(axis=0).sum()
  return float(1 - busy.sum() / (busy.shape[0] * makespan))


def scheduled(name: str, stage_fn, loss_fn, axis: str = "stage", batch_axes=None,
              has_aux: bool = False, loss_has_aux: bool = False, param_specs=None,
              loss_param_specs=None):
  """The loss and gradients of the stages in sequence, run by schedule `name`.

  `param_specs` (a PartitionSpec per leaf of the stage parameters, each starting with `axis`;
  None: `P(axis)` for every leaf) and `loss_param_specs` (likewise for the loss's parameters;
  None: replicated) split leaves over manual batch axes too, as expert parallelism splits
  the routed experts over `expert`: such a leaf's gradient is summed over the other batch
  axes only."""
  data_axes = (() if batch_axes is None else
               (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
  batch = P(None, data_axes or None)

  def run(stage_params, microbatches, targets, loss_params=None):
    num_stages = jax.tree.leaves(stage_params)[0].shape[0]
    num_devices = jax.sharding.get_abstract_mesh().shape[axis]
    if num_stages % num_devices:
      raise schedules.ScheduleError(f"{num_stages} stages do not split over {num_devices} "
                                    f"devices of mesh axis {axis!r}")
    schedule = schedules.make(name, num_devices, microbatches.shape[0])
    if schedule.num_stages != num_stages:
      raise schedules.ScheduleError(
          f"{name} on {num_devices} devices runs {schedule.num_stages} stages, got {num_stages}")
    # Each device's stages next to each other (DualPipeV's V: d and 2D - 1 - d), and back.
    order = np.array([s for stages in schedule.stages_of_device for s in stages])
    loss_with_aux = loss_fn if loss_has_aux else lambda *a: (loss_fn(*a), ())
    specs = jax.tree.map(lambda _: P(axis), stage_params) if param_specs is None else param_specs
    loss_specs = (jax.tree.map(lambda _: P(), loss_params) if loss_param_specs is None
                  else loss_param_specs)
    per_device = functools.partial(_play, _with_aux(stage_fn, has_aux), loss_with_aux, axis,
                                   data_axes, tick_table(schedule),
                                   len(schedule.stages_of_device[0]), (specs, loss_specs))
    manual = {axis, *data_axes}
    loss, grads, input_grads, stats, loss_grads, loss_stats = jax.shard_map(
        per_device, in_specs=(specs, batch, batch, loss_specs),
        out_specs=(P(), specs, batch, P(axis), loss_specs, P()), axis_names=manual)(
        jax.tree.map(lambda p: p[order], stage_params), microbatches, targets, loss_params)
    in_stage_order = lambda tree: jax.tree.map(lambda g: g[np.argsort(order)], tree)
    return Result(loss, in_stage_order(grads), input_grads, in_stage_order(stats), loss_grads,
                  loss_stats)
  return run


def _with_aux(stage_fn, has_aux: bool):
  """stage_fn as (params, x) -> ((y, aux_loss), stats), whatever it returns."""
  if has_aux:
    def split(params, x):
      y, (aux_loss, stats) = stage_fn(params, x)
      return (y, aux_loss), stats
  else:
    def split(params, x):
      return (stage_fn(params, x), jnp.zeros((), jnp.float32)), ()
  return split


def _spec_axes(spec: P) -> set[str]:
  return {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}


def _play(stage_fn, loss_fn, axis, data_axes: tuple[str, ...], table: TickTable, num_chunks: int,
          specs, stage_params, microbatches, targets, loss_params):
  num_devices = jax.lax.axis_size(axis)
  device = jax.lax.axis_index(axis)
  varying = varying_along((axis, *data_axes))   # loop carries differ along every manual axis
  # Each data shard's own parameter gradient (summed over the shards at the end): without this
  # the pullback of parameters shared by the shards would sum them already.
  params = jax.tree.map(varying, stage_params)              # [C, ...]: this device's stages
  # Likewise the loss's parameters: the pullback of a value shared by the devices would sum
  # its gradient over them inside a backward tick, a collective only some devices reach.
  loss_params = jax.tree.map(varying, loss_params)
  mine = [jnp.asarray(column)[device] for column in table]
  to_next = [(i, (i + 1) % num_devices) for i in range(num_devices)]
  to_previous = [((i + 1) % num_devices, i) for i in range(num_devices)]
  first_stage = (device == 0)
  last_stage = (device == (0 if num_chunks == 2 else num_devices - 1))   # ... in its last chunk
  zero = varying(jnp.zeros_like(microbatches[0]))
  at = lambda buffer, *i: buffer[i]
  put = lambda buffer, value, *i: buffer.at[i].set(value)

  def stage_of(chunk):
    return jax.tree.map(lambda p: p[chunk], params)

  def output_gradient(state, chunk, microbatch, out):
    """The loss's gradient on the last stage (and the loss, and the gradient of the loss's
    parameters), else what the next stage sent (and zeros). Only the last stage computes the
    loss (an output head's logits are costly): the other devices take the other branch."""
    def from_loss(_):
      (value, stats), (loss_params_grad, loss_grad) = jax.value_and_grad(
          loss_fn, (0, 1), has_aux=True)(loss_params, out, at(targets, microbatch))
      return loss_grad, value, loss_params_grad, jax.tree.map(varying, stats)

    def from_next_stage(_):
      return (at(state["buffers"], GRADIENTS, chunk, microbatch), varying(jnp.zeros(())),
              jax.tree.map(jnp.zeros_like, loss_params),
              jax.tree.map(jnp.zeros_like, state["loss_stats"]))

    is_last = last_stage & (chunk == num_chunks - 1)
    grad_out, value, loss_params_grad, stats = jax.lax.cond(is_last, from_loss,
                                                            from_next_stage, None)
    loss_grads = jax.tree.map(jnp.add, state["loss_grads"], loss_params_grad)
    return grad_out, value, (loss_grads, jax.tree.map(jnp.add, state["loss_stats"], stats))

  def add(totals, chunk, values):
    return jax.tree.map(lambda total, value: total.at[chunk].add(value), totals, values)

  def forward(state, chunk, microbatch):
    x = jnp.where(first_stage & (chunk == 0), at(microbatches, microbatch),
                  at(state["buffers"], INPUTS, chunk, microbatch))
    (y, aux_loss), stats = stage_fn(stage_of(chunk), x)
    return dict(state, kept=put(state["kept"], x, chunk, microbatch),
                stats=add(state["stats"], chunk, stats),
                loss=state["loss"] + aux_loss), y

  def differentiable(params, x):
    return stage_fn(params, x)[0]               # (y, aux_loss)

  def cotangent(grad_out, aux_loss):
    return grad_out, jnp.ones_like(aux_loss)    # the aux loss enters the loss as it is

  def keep_input_gradient(state, chunk, microbatch, grad_x):
    """The first stage's input gradient has no stage to go to: it is returned."""
    is_first = first_stage & (chunk == 0)
    current = at(state["input_grads"], microbatch)
    return put(state["input_grads"], jnp.where(is_first, grad_x, current), microbatch)

  def full_backward(state, chunk, microbatch):
    (out, aux_loss), pullback = jax.vjp(differentiable, stage_of(chunk),
                                        at(state["kept"], chunk, microbatch))
    grad_out, loss, (loss_grads, loss_stats) = output_gradient(state, chunk, microbatch, out)
    grad_params, grad_x = pullback(cotangent(grad_out, aux_loss))
    return dict(state, grads=add(state["grads"], chunk, grad_params), loss_grads=loss_grads,
                loss_stats=loss_stats,
                input_grads=keep_input_gradient(state, chunk, microbatch, grad_x),
                loss=state["loss"] + loss), grad_x

  def input_gradient(state, chunk, microbatch):
    params_now = stage_of(chunk)
    (out, aux_loss), pullback = jax.vjp(lambda x: differentiable(params_now, x),
                                        at(state["kept"], chunk, microbatch))
    grad_out, loss, (loss_grads, loss_stats) = output_gradient(state, chunk, microbatch, out)
    (grad_x,) = pullback(cotangent(grad_out, aux_loss))
    return dict(state, deferred=put(state["deferred"], grad_out, chunk, microbatch),
                loss_grads=loss_grads, loss_stats=loss_stats,
                input_grads=keep_input_gradient(state, chunk, microbatch, grad_x),
                loss=state["loss"] + loss), grad_x

  def weight_gradient(state, chunk, microbatch):
    x = at(state["kept"], chunk, microbatch)
    (_, aux_loss), pullback = jax.vjp(lambda p: differentiable(p, x), stage_of(chunk))
    (grad_params,) = pullback(cotangent(at(state["deferred"], chunk, microbatch), aux_loss))
    return dict(state, grads=add(state["grads"], chunk, grad_params)), zero

  def idle(state, chunk, microbatch):
    return state, zero

  forward_lane = [idle, forward]
  backward_lane = [idle, full_backward, input_gradient, weight_gradient]

  def tick(state, t):
    column = [c[t] for c in mine]                     # each [2]: the two lanes
    kinds, chunks, microbatches_now = column[0], column[1], column[2]
    state, forwarded = jax.lax.switch(jnp.minimum(kinds[FORWARD_LANE], 1), forward_lane, state,
                                      chunks[FORWARD_LANE], microbatches_now[FORWARD_LANE])
    state, backwarded = jax.lax.switch(jnp.maximum(kinds[BACKWARD_LANE] - 1, 0), backward_lane,
                                       state, chunks[BACKWARD_LANE],
                                       microbatches_now[BACKWARD_LANE])
    # Send each result where its stage's neighbour lives; file what arrives by micro-batch.
    buffers = state["buffers"]
    for lane, result in ((FORWARD_LANE, forwarded), (BACKWARD_LANE, backwarded)):
      _, _, microbatch, direction, to_chunk, to_buffer = (c[lane] for c in column)
      for where, permutation in ((NEXT_DEVICE, to_next), (PREVIOUS_DEVICE, to_previous)):
        sent = (result, to_chunk, to_buffer, microbatch, direction == where)
        value, c, b, m, valid = jax.lax.ppermute(sent, axis, permutation)
        buffers = put(buffers, jnp.where(valid, value, at(buffers, b, c, m)), b, c, m)
      here = jnp.where(direction == SAME_DEVICE, result,
                       at(buffers, to_buffer, to_chunk, microbatch))
      buffers = put(buffers, here, to_buffer, to_chunk, microbatch)
    return dict(state, buffers=buffers), None

  per_chunk = varying(jnp.zeros((num_chunks,) + microbatches.shape, microbatches.dtype))
  start = {"buffers": varying(jnp.zeros((2, num_chunks) + microbatches.shape,
                                        microbatches.dtype)),
           "kept": per_chunk, "deferred": per_chunk,
           "input_grads": varying(jnp.zeros_like(microbatches)),
           "grads": jax.tree.map(lambda p: varying(jnp.zeros_like(p)), params),
           "stats": jax.tree.map(
               lambda leaf: varying(jnp.zeros((num_chunks,) + leaf.shape, leaf.dtype)),
               jax.eval_shape(stage_fn, stage_of(0), varying(microbatches[0]))[1]),
           "loss": varying(jnp.zeros((), jnp.float32)),
           "loss_grads": jax.tree.map(lambda p: varying(jnp.zeros_like(p)), loss_params),
           "loss_stats": jax.tree.map(
               lambda leaf: varying(jnp.zeros(leaf.shape, leaf.dtype)),
               jax.eval_shape(loss_fn, loss_params, varying(microbatches[0]), targets[0])[1])}
  state, _ = jax.lax.scan(tick, start, jnp.arange(table.kind.shape[1]))
  loss, input_grads, loss_grads, loss_stats = jax.lax.psum(
      (state["loss"], state["input_grads"], state["loss_grads"], state["loss_stats"]), axis)
  grads, stats = state["grads"], state["stats"]
  if data_axes:
    loss, stats, loss_stats = jax.lax.psum((loss, stats, loss_stats), data_axes)

    def summed(gradient, spec):   # over the batch axes the leaf is not split over
      others = tuple(a for a in data_axes if a not in _spec_axes(spec))
      return jax.lax.psum(gradient, others) if others else gradient
    grads, loss_grads = (jax.tree.map(summed, tree, tree_specs)
                         for tree, tree_specs in zip((grads, loss_grads), specs))
  return loss, grads, input_grads, stats, loss_grads, loss_stats
