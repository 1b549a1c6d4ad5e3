"""Loop-over-experts reference: every expert sees every token, the gates pick. Slow, obviously right."""

import jax.numpy as jnp

from moe_jax.dispatch.base import Dispatched


def reference_dispatch(x, expert_ids, gates, experts, capacity_factor=None):
  """y = sum_e (sum of the gates that chose e) * expert_e(x); nothing is ever dropped."""
  del capacity_factor
  num_experts = experts.num_experts
  all_outputs_ExTxD = experts(jnp.broadcast_to(x, (num_experts, *x.shape)))
  y = jnp.zeros_like(x, dtype=jnp.float32)
  for e in range(num_experts):
    weight_T = jnp.sum(jnp.where(expert_ids == e, gates, 0.0), axis=-1)
    y = y + weight_T[:, None] * all_outputs_ExTxD[e].astype(jnp.float32)
  return Dispatched(y.astype(x.dtype), jnp.zeros((), jnp.float32))
