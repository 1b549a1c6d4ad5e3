"""Sort-based dispatch into a static [E, C, D] buffer (fast on GPU; runs everywhere).

1. Flatten the T*K (token, slot) assignments, sort them by expert (int32 keys) and, within an
   expert, by falling gate, so that when an expert is over capacity its lowest gates drop.
2. Slot c of expert e reads the assignment at sorted position start_e + c, if c < count_e:
   a gather, no scatter. Empty slots read zeros.
3. One batched matmul over experts (`experts`), then each kept assignment reads its result
   back from (e, rank) and the inverse permutation restores token order.
"""

import math

import jax.numpy as jnp

from moe_jax.dispatch.base import Dispatched, combine_sorted


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(factor * T * K / E), at least 1 and never more than T."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_dispatch(x, expert_ids, gates, experts, capacity_factor):
  num_tokens, top_k = expert_ids.shape
  num_experts = experts.num_experts
  capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)

  flat_experts = expert_ids.reshape(-1).astype(jnp.int32)
  flat_gates = gates.reshape(-1)
  by_gate = jnp.argsort(-flat_gates)                                       # highest gate first
  order = by_gate[jnp.argsort(flat_experts[by_gate], stable=True)]          # then by expert
  sorted_experts = flat_experts[order]
  sorted_tokens = order // top_k

  counts_E = jnp.bincount(flat_experts, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank = jnp.arange(order.shape[0]) - starts_E[sorted_experts]            # position in its expert
  kept = rank < capacity

  slot_c = jnp.arange(capacity)
  source_ExC = jnp.minimum(starts_E[:, None] + slot_c[None, :], order.shape[0] - 1)
  filled_ExC = slot_c[None, :] < counts_E[:, None]
  buffer_ExCxD = jnp.where(filled_ExC[..., None], x[sorted_tokens[source_ExC]], 0)

  out_ExCxD = experts(buffer_ExCxD)

  safe_rank = jnp.minimum(rank, capacity - 1)
  sorted_out = jnp.where(kept[:, None], out_ExCxD[sorted_experts, safe_rank], 0)
  y = combine_sorted(sorted_out, order, gates)
  dropped = jnp.sum(jnp.maximum(counts_E - capacity, 0)).astype(jnp.float32)
  return Dispatched(y.astype(x.dtype), dropped)
