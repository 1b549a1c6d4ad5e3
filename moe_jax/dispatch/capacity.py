"""Sort-based dispatch into a static [E, C, D] buffer (fast on GPU; runs everywhere).

1. Flatten the T*K (token, slot) assignments, sort them by expert (int32 keys) and, within an
   expert, by falling gate, so that when an expert is over capacity its lowest gates drop.
2. Slot c of expert e reads the assignment at sorted position start_e + c, if c < count_e:
   a gather, no scatter. Empty slots read zeros.
3. One batched matmul over experts (`experts`), then each kept assignment, in token order,
   reads its result back from slot (e, rank).
Both gathers are one-to-one between filled slots and kept assignments, so their gradients are
gathers the other way (`masked_gather`), not scatter-adds.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from moe_jax.dispatch.base import Dispatched, group_sizes, inverse_permutation, masked_gather


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(factor * T * K / E), at least 1 and never more than T."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_order(flat_experts: Int[Array, "N"], flat_gates: Float[Array, "N"], num_experts: int):
  """(order, rank, counts): the assignments sorted by expert and, within an expert, by falling
  gate; each sorted assignment's position in its expert (a capacity C keeps rank < C, so the
  lowest gates drop first); assignments per expert."""
  by_gate = jnp.argsort(-flat_gates)                                       # highest gate first
  order = by_gate[jnp.argsort(flat_experts[by_gate], stable=True)]          # then by expert
  counts_E = group_sizes(flat_experts, num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank = jnp.arange(order.shape[0]) - starts_E[flat_experts[order]]       # position in its expert
  return order, rank, counts_E


def capacity_dispatch(x, expert_ids, gates, experts, capacity_factor):
  num_tokens, top_k = expert_ids.shape
  num_experts = experts.num_experts
  capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)

  flat_experts = expert_ids.reshape(-1).astype(jnp.int32)
  order, rank, counts_E = capacity_order(flat_experts, gates.reshape(-1), num_experts)
  sorted_experts = flat_experts[order]
  sorted_tokens = order // top_k
  starts_E = jnp.cumsum(counts_E) - counts_E
  kept = rank < capacity

  slot_c = jnp.arange(capacity)
  source_S = (jnp.minimum(starts_E[:, None] + slot_c[None, :], order.shape[0] - 1)).reshape(-1)
  filled_S = (slot_c[None, :] < counts_E[:, None]).reshape(-1)     # S = E * C slots
  slot_of_sorted = sorted_experts * capacity + jnp.minimum(rank, capacity - 1)
  inverse = inverse_permutation(order)                              # token order t * K + k
  slot_of_assignment, kept_assignment = slot_of_sorted[inverse], kept[inverse]

  buffer_SxD = masked_gather(x, sorted_tokens[source_S], filled_S, slot_of_assignment,
                             kept_assignment, top_k)
  out_SxD = experts(buffer_SxD.reshape(num_experts, capacity, -1)).reshape(buffer_SxD.shape)
  rows_NxD = masked_gather(out_SxD, slot_of_assignment, kept_assignment, order[source_S], filled_S)
  rows_TxKxD = rows_NxD.reshape(num_tokens, top_k, -1)
  y = jnp.einsum("tkd,tk->td", rows_TxKxD.astype(jnp.float32), gates.astype(jnp.float32))
  dropped = jnp.sum(jnp.maximum(counts_E - capacity, 0)).astype(jnp.float32)
  return Dispatched(y.astype(x.dtype), dropped)
