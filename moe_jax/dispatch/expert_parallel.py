"""Expert parallelism: routed experts sharded over the mesh axis `expert`, inside `jax.shard_map`.

Every device holds E_l = E / P experts (P = size of the `expert` axis) and its own share of
the tokens (the batch is split over every token axis, `data` and `expert`). Variants:

* `all_to_all`: capacity dispatch over the device's tokens into a send buffer [E, C, D] with a
  per-peer capacity C = ceil(capacity_factor * T_local * K / E); one all_to_all sends each
  expert's rows to its owner, the owner runs its experts on [E_l, P * C, D], a second
  all_to_all returns the results. Overflow is dropped and counted, as in `capacity`.
* `all_gather`: all-gather the tokens and the routing of the `expert` group, run the local
  experts on the assignments that are theirs (sorted, ragged groups, dropless), and
  reduce-scatter the partial outputs back to the tokens' owners. Nothing is dropped.
* `ragged_all_to_all`: sends exactly the routed rows (no padding) with
  `jax.lax.ragged_all_to_all`; backends without it (CPU) are refused at config validation.
  Dropless, its receive buffers sized for the worst case, unless a capacity bounds them
  (`dispatch.ragged_capacity_factor`: then `all_to_all`'s drops, without its padding).
* `token_all_to_all`: each token sent once to each rank that holds one of its experts (not
  once per expert), in a [P, T, D] buffer, with its local expert ids and gates; each rank runs
  its experts on what arrived (dropless) and returns one summed row per token.

Shape letters: T tokens of this device, D model width, K top-k, E experts, P expert-axis size.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.dispatch.base import (Dispatched, combine_sorted, gather_assignments, group_sizes,
                                   inverse_permutation)
from moe_jax.dispatch.capacity import capacity_dispatch, capacity_order, expert_capacity
from moe_jax.dispatch.experts import SwiGLUExperts
from moe_jax.dispatch.replicas import tables
from moe_jax.manual_axes import varying_axes

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")   # parallel.BATCH_AXES
VARIANTS = ("all_to_all", "all_gather", "ragged_all_to_all", "token_all_to_all")
# The single-device dispatch each variant performs across devices (what dispatch.strategy must say).
DISPATCHER_OF_VARIANT = {"all_to_all": "capacity", "all_gather": "dropless",
                         "ragged_all_to_all": "dropless", "token_all_to_all": "dropless"}


class AllToAllExperts(NamedTuple):
  """All E experts as seen from one device: local ones run here, the rest on their owners."""

  local: SwiGLUExperts
  axis_size: int

  @property
  def num_experts(self) -> int:
    return self.local.num_experts * self.axis_size

  def __call__(self, send_ExCxD):
    peers, local = self.axis_size, self.local.num_experts
    capacity, width = send_ExCxD.shape[1:]
    exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
    received_PxLxCxD = exchange(send_ExCxD.reshape(peers, local, capacity, width))
    rows_LxPCxD = received_PxLxCxD.transpose(1, 0, 2, 3).reshape(local, peers * capacity, width)
    out_PxLxCxD = self.local(rows_LxPCxD).reshape(local, peers, capacity, width).transpose(1, 0, 2, 3)
    return exchange(out_PxLxCxD).reshape(peers * local, capacity, width)


def _all_to_all(x, expert_ids, gates, local_experts, capacity_factor):
  experts = AllToAllExperts(local_experts, jax.lax.axis_size(EXPERT_AXIS))
  return capacity_dispatch(x, expert_ids, gates, experts, capacity_factor)


def _gathered(x, expert_ids, gates):
  """The tokens, expert ids and gates of the whole `expert` group, on every rank of it."""
  gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
  return gather(x), gather(expert_ids), gather(gates)


def _local_outputs(x_N, gates_NxK, slot_NK, experts: SwiGLUExperts):
  """[N, D] float32: for each of N tokens, the gate-weighted sum of this rank's experts on it:
  its assignments whose `slot_NK` names one of this rank's expert slots (the rest carry
  `experts.num_experts`), run sorted, in ragged groups."""
  slots, top_k = experts.num_experts, gates_NxK.shape[1]
  order = jnp.argsort(slot_NK, stable=True)                    # others sort last, in no group
  inverse = inverse_permutation(order)
  sizes = group_sizes(slot_NK, slots)
  sorted_out = experts.ragged(gather_assignments(x_N, order, inverse, top_k), sizes)
  mine = (slot_NK < slots)[order]
  return combine_sorted(jnp.where(mine[:, None], sorted_out, 0), order, gates_NxK, inverse)


def _run_mine(x_all, gates_all, slot_N, experts: SwiGLUExperts, out_dtype) -> Dispatched:
  """The gathered tokens through this rank's experts (`_local_outputs`), the partial outputs
  reduce-scattered back to the tokens' ranks."""
  partial = _local_outputs(x_all, gates_all, slot_N, experts)
  y = jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)
  return Dispatched(y.astype(out_dtype), jnp.zeros((), jnp.float32))


def _all_gather(x, expert_ids, gates, local_experts, capacity_factor):
  del capacity_factor
  x_all, ids_all, gates_all = _gathered(x, expert_ids, gates)
  local = local_experts.num_experts
  local_ids = ids_all.reshape(-1).astype(jnp.int32) - jax.lax.axis_index(EXPERT_AXIS) * local
  slot = jnp.where((local_ids >= 0) & (local_ids < local), local_ids, local)
  return _run_mine(x_all, gates_all, slot, local_experts, x.dtype)


def serving_ranks(expert_ids_N, replicas) -> jnp.ndarray:
  """[N]: the rank whose copy serves each assignment (`expert_ids_N` in order): an expert's
  assignments in consecutive runs, one per copy, home first (`replicas.replica_of_assignment`
  is the NumPy reference)."""
  num_experts = replicas.copies.shape[0]
  by_expert = jnp.argsort(expert_ids_N, stable=True)
  counts = group_sizes(expert_ids_N, num_experts)
  position = inverse_permutation(by_expert) - (jnp.cumsum(counts) - counts)[expert_ids_N]
  copy = position * replicas.copies[expert_ids_N] // jnp.maximum(counts[expert_ids_N], 1)
  return replicas.copy_rank[expert_ids_N, copy]


def _all_gather_replicated(spare_slots, x, expert_ids, gates, local_experts, capacity_factor):
  """`all_gather` with replicas of hot experts (`dispatch/replicas.py`): each rank runs its
  home experts and the copies in its spare slots (`spare_slots` [P or more, R]: row p, rank
  p's; rows past the axis unused); an expert's assignments (in the gathered order) split into
  consecutive runs, one per copy, exactly as `replica_of_assignment` splits them. The copies'
  weights are fetched from their home ranks each step (`_fetch_copies`), so their gradients
  flow back into the home weights (summed there): one set of weights and optimizer state,
  whatever the plan."""
  del capacity_factor
  x_all, ids_all, gates_all = _gathered(x, expert_ids, gates)
  ranks, rank = jax.lax.axis_size(EXPERT_AXIS), jax.lax.axis_index(EXPERT_AXIS)
  num_experts = local_experts.num_experts * ranks
  replicas = tables(spare_slots[:ranks], num_experts)
  flat = ids_all.reshape(-1).astype(jnp.int32)
  slots = replicas.slot_expert[rank]                                # [E / P + R]
  slot_of = jnp.full(num_experts + 1, slots.shape[0], jnp.int32).at[
      jnp.where(slots >= 0, slots, num_experts)].set(jnp.arange(slots.shape[0], dtype=jnp.int32))
  slot = jnp.where(serving_ranks(flat, replicas) == rank, slot_of[flat], slots.shape[0])
  fetch = functools.partial(_fetch_copies, replicas.slot_expert[:, local_experts.num_experts:])
  with_copies = dataclasses.replace(local_experts, **{
      name: jnp.concatenate([weight, fetch(weight)]) for name, weight in (
          ("w_gate", local_experts.w_gate), ("w_up", local_experts.w_up),
          ("w_down", local_experts.w_down))})
  return _run_mine(x_all, gates_all, slot, with_copies, x.dtype)


def _fetch_copies(spare_PxR, local_weights):
  """[R, ...]: the weights of the experts in this rank's spare slots, from their home ranks
  (zeros for an empty slot). One all_to_all: each rank sends every rank the weights it is home
  to for that rank's slots (zeros elsewhere), and sums what arrives; its transpose returns
  each copy's gradient to the home weights."""
  local = local_weights.shape[0]
  rank = jax.lax.axis_index(EXPERT_AXIS)
  is_home = (spare_PxR >= 0) & (spare_PxR // local == rank)
  index = jnp.clip(spare_PxR - rank * local, 0, local - 1)
  outgoing = jnp.where(is_home.reshape(is_home.shape + (1,) * (local_weights.ndim - 1)),
                       local_weights[index], 0)                     # [P, R, ...] by destination
  arriving = jax.lax.all_to_all(outgoing, EXPERT_AXIS, 0, 0, tiled=True)   # [P, R, ...] by source
  return jnp.sum(arriving, axis=0)


def _ragged_all_to_all(x, expert_ids, gates, local_experts, capacity_factor):
  """Exactly the routed rows travel: sizes are exchanged first, then one ragged exchange each
  way. `capacity_factor` 0: every routed row, into receive buffers sized for the worst case
  (P x T x K rows: everything comes here); > 0 (`dispatch.ragged_capacity_factor`): each
  expert takes at most C = ceil(factor x T x K / E) of this device's rows, those of the highest
  gates (`all_to_all`'s capacity rule, without its padding on the wire), which bounds each
  receive buffer at E x C rows; the rest drop and are counted."""
  peers, local = jax.lax.axis_size(EXPERT_AXIS), local_experts.num_experts
  num_tokens, top_k = expert_ids.shape
  rows, num_experts = num_tokens * top_k, peers * local
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  if capacity_factor:
    cap = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    order, rank, counts = capacity_order(flat, gates.reshape(-1), num_experts)
    order = order[jnp.argsort(rank >= cap, stable=True)]       # kept rows first, by expert
    per_expert, capacity = jnp.minimum(counts, cap), num_experts * cap
  else:
    order = jnp.argsort(flat, stable=True)                      # grouped by owner, then expert
    per_expert, capacity = group_sizes(flat, num_experts), peers * rows
  inverse = inverse_permutation(order)
  send = gather_assignments(x, order, inverse, top_k)
  send_sizes = per_expert.reshape(peers, local).sum(axis=1)
  input_offsets = jnp.cumsum(send_sizes) - send_sizes
  exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
  recv_per_expert_PxL = exchange(per_expert.reshape(peers, local))   # from each source, per local expert
  recv_sizes = recv_per_expert_PxL.sum(axis=1)
  # Where my rows land in each peer's receive buffer: after the rows of lower-ranked sources.
  offsets_at_peer = exchange(jnp.broadcast_to(
      (jnp.cumsum(recv_sizes) - recv_sizes)[:, None], (peers, 1))).reshape(peers)
  # The receive buffers differ per device: typed so (a zeros constant is typed as the same
  # everywhere, which would make the gradients of what arrives in them sum over devices).
  buffer = lambda shape: jax.lax.pcast(jnp.zeros(shape, x.dtype), EXPERT_AXIS, to="varying")
  received = jax.lax.ragged_all_to_all(send, buffer((capacity, x.shape[1])),
                                       input_offsets, send_sizes, offsets_at_peer, recv_sizes,
                                       axis_name=EXPERT_AXIS)
  # Received rows are grouped by source, then expert: regroup by expert for the ragged matmul.
  source_expert = jnp.repeat(jnp.tile(jnp.arange(local), peers), recv_per_expert_PxL.reshape(-1),
                             total_repeat_length=capacity)
  valid = jnp.arange(capacity) < recv_sizes.sum()
  key = jnp.where(valid, source_expert, local)
  by_expert = jnp.argsort(key, stable=True)
  sizes = recv_per_expert_PxL.sum(axis=0)
  out = local_experts.ragged(received[by_expert], sizes)
  out = jnp.zeros_like(out).at[by_expert].set(out)
  back_offsets = exchange(jnp.broadcast_to(input_offsets[:, None], (peers, 1))).reshape(peers)
  returned = jax.lax.ragged_all_to_all(out, buffer((rows, x.shape[1])),
                                       jnp.cumsum(recv_sizes) - recv_sizes, recv_sizes,
                                       back_offsets, send_sizes, axis_name=EXPERT_AXIS)
  y = combine_sorted(returned, order, gates, inverse)   # dropped rows' places stay zero
  return Dispatched(y.astype(x.dtype), (rows - jnp.sum(per_expert)).astype(jnp.float32))


def _token_all_to_all(x, expert_ids, gates, local_experts, capacity_factor):
  """Each token travels once to each rank that holds one of its experts (as DeepEP's
  dispatch does), not once per expert: a [P, T, D] buffer whose slot (r, t) holds token t when
  it uses one of rank r's experts (zeros otherwise), with the token's local expert ids and
  gates for that rank; each rank runs its experts on what arrived (sorted, ragged: nothing
  drops) and returns one row per token, the gate-weighted sum of its experts' outputs, which
  the token's own rank adds up over the ranks. Moves P x T rows each way where `all_to_all`
  moves capacity_factor x T x K."""
  del capacity_factor
  peers, local = jax.lax.axis_size(EXPERT_AXIS), local_experts.num_experts
  num_tokens, top_k = expert_ids.shape
  ids = expert_ids.astype(jnp.int32)
  rank_P = jnp.arange(peers, dtype=jnp.int32)[:, None, None]
  on_rank_PxTxK = (ids // local)[None] == rank_P
  slot_PxTxK = jnp.where(on_rank_PxTxK, ids[None] - rank_P * local, local)   # local: none there
  gates_PxTxK = jnp.where(on_rank_PxTxK, gates[None], 0)
  send_PxTxD = jnp.where(on_rank_PxTxK.any(axis=2)[..., None], x[None], 0)
  exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
  received, slots, received_gates = (exchange(a) for a in (send_PxTxD, slot_PxTxK, gates_PxTxK))
  out = _local_outputs(received.reshape(peers * num_tokens, -1),
                       received_gates.reshape(peers * num_tokens, top_k),
                       slots.reshape(-1), local_experts)
  back_PxTxD = exchange(out.astype(x.dtype).reshape(peers, num_tokens, -1))
  y = jnp.sum(back_PxTxD.astype(jnp.float32), axis=0)
  return Dispatched(y.astype(x.dtype), jnp.zeros((), jnp.float32))


_VARIANT_FUNCTIONS = {"all_to_all": _all_to_all, "all_gather": _all_gather,
                      "ragged_all_to_all": _ragged_all_to_all,
                      "token_all_to_all": _token_all_to_all}


def _in_chunks(function, chunks: int):
  """`function` over `chunks` equal slices of the device's tokens, one after another in the
  program. The slices do not depend on each other, so the compiler may run one slice's
  exchange while another's experts compute (overlap). Capacity applies per slice."""
  if chunks == 1:
    return function

  def run(x, expert_ids, gates, local_experts, capacity_factor):
    split = lambda a: jnp.split(a, chunks)
    outs = [function(*piece, local_experts, capacity_factor)
            for piece in zip(split(x), split(expert_ids), split(gates))]
    return Dispatched(jnp.concatenate([o.output for o in outs]), sum(o.dropped for o in outs))
  return run


def expert_parallel_dispatch(variant: str, x_BxSxD, expert_ids_BxSxK, gates_BxSxK,
                             experts: SwiGLUExperts, capacity_factor: float, chunks: int = 1,
                             replica_slots=None):
  """Runs one expert-parallel variant over the context mesh (`jax.set_mesh`).

  `capacity_factor`: `all_to_all`'s per-expert capacity; `ragged_all_to_all`'s cap on what each
  expert takes from a device (0: none, every routed row travels); `all_gather` and
  `token_all_to_all` drop nothing.

  Takes global arrays: tokens split over ("data", "expert"), expert weights over "expert".
  Inside a caller's `jax.shard_map` already manual over `expert` and the other token axes,
  the tokens split over all of them (as a pipeline stage's would be), it takes that device's
  arrays (its tokens and its E / P experts) and runs the per-device dispatch there (with
  every mesh axis manual: under a partly manual shard_map `jnp.searchsorted`, which the
  ragged groups' row layouts call, fails an internal check of jax 0.10.2 and 0.11.2, so
  `all_gather` and `ragged_all_to_all` fail there). Each device dispatches its tokens as one
  group, or as `chunks` groups of equal size (see `_in_chunks`). `replica_slots` (`all_gather`
  only; int32 [P or more, R], row p the experts in rank p's spare slots, -1 empty): copies of
  hot experts that share their experts' tokens (`_all_gather_replicated`). Returns the output
  [B, S, D] and the number of dropped assignments: all devices' (inside a caller's shard_map,
  this device's, which the caller sums with its other per-device statistics).
  """
  if replica_slots is not None and variant != "all_gather":
    raise ValueError(f"replicas of hot experts run with the 'all_gather' variant, not {variant!r}")
  extra = () if replica_slots is None else (replica_slots,)
  if not experts.fp8:   # the weights travel between devices (replicas, gathers) in bf16
    experts = experts.in_dtype(x_BxSxD.dtype)
  manual = tuple(axis for axis in TOKEN_AXES
                 if axis in jax.sharding.get_abstract_mesh().manual_axes)

  def per_device(x, ids, gates, w_gate, w_up, w_down, *spare_slots, whole_count=True):
    batch, seq, width = x.shape
    local = dataclasses.replace(experts, w_gate=w_gate, w_up=w_up, w_down=w_down)
    variant_function = (functools.partial(_all_gather_replicated, *spare_slots) if spare_slots
                        else _VARIANT_FUNCTIONS[variant])
    out = _in_chunks(variant_function, chunks)(
        x.reshape(batch * seq, width), ids.reshape(batch * seq, -1),
        gates.reshape(batch * seq, -1), local, capacity_factor)
    dropped = jax.lax.psum(out.dropped, TOKEN_AXES) if whole_count else out.dropped
    return out.output.reshape(batch, seq, width), dropped

  if manual:   # inside a caller's shard_map: these are this device's tokens and experts
    whole = set(manual) - varying_axes(x_BxSxD)
    if EXPERT_AXIS not in manual or whole:
      raise ValueError(f"expert parallelism inside a shard_map manual over {manual} needs the "
                       f"experts split over {EXPERT_AXIS!r} and the tokens over every one of "
                       f"those axes (not split over: {sorted(whole) or [EXPERT_AXIS]})")
    return per_device(x_BxSxD, expert_ids_BxSxK, gates_BxSxK, experts.w_gate, experts.w_up,
                      experts.w_down, *extra, whole_count=False)
  tokens, weights = P(TOKEN_AXES), P(EXPERT_AXIS)
  return jax.shard_map(per_device, in_specs=(tokens, tokens, tokens, weights, weights, weights,
                                             *[P()] * len(extra)),
                       out_specs=(tokens, P()))(
      x_BxSxD, expert_ids_BxSxK, gates_BxSxK, experts.w_gate, experts.w_up, experts.w_down,
      *extra)
