"""GShard-style dispatch: one-hot dispatch and combine tensors [T, E, C] and two einsums.

Readable, and memory-hungry on purpose of comparison: the [T, E, C] tensors grow with
tokens x experts x capacity (C itself grows with T). Priority for capacity is GShard's:
all first choices before any second choice, then token order. Over capacity, an assignment
is dropped and counted.
"""

import jax
import jax.numpy as jnp

from moe_jax.dispatch.base import Dispatched
from moe_jax.dispatch.capacity import expert_capacity


def dense_dispatch(x, expert_ids, gates, experts, capacity_factor):
  num_tokens, top_k = expert_ids.shape
  num_experts = experts.num_experts
  capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
  chosen_KTxE = jax.nn.one_hot(expert_ids.T.reshape(-1), num_experts, dtype=jnp.int32)
  position_KTxE = jnp.cumsum(chosen_KTxE, axis=0) * chosen_KTxE - 1     # -1 where not chosen
  kept_KTxE = (position_KTxE >= 0) & (position_KTxE < capacity)
  slot_KTxExC = jax.nn.one_hot(jnp.where(kept_KTxE, position_KTxE, -1), capacity, dtype=x.dtype)
  slot_KxTxExC = slot_KTxExC.reshape(top_k, num_tokens, num_experts, capacity)
  dispatch_TxExC = jnp.sum(slot_KxTxExC, axis=0)
  combine_TxExC = jnp.einsum("ktec,tk->tec", slot_KxTxExC, gates.astype(x.dtype))
  buffer_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC, x)
  out_ExCxD = experts(buffer_ExCxD)
  y = jnp.einsum("tec,ecd->td", combine_TxExC.astype(jnp.float32), out_ExCxD.astype(jnp.float32))
  dropped = (jnp.sum(chosen_KTxE) - jnp.sum(kept_KTxE)).astype(jnp.float32)
  return Dispatched(y.astype(x.dtype), dropped)
