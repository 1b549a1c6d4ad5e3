"""Dropless dispatch: assignments sorted by expert, one grouped matmul over ragged groups.

Nothing is dropped and no capacity is padded. The grouped matmuls are the experts' `ragged`
method: GPU kernels on GPU (moe_jax/kernels/grouped_matmul.py), `jax.lax.ragged_dot`
elsewhere. The permutation into expert order and back are gathers whose gradients are gathers
too (dispatch/base.py), not scatter-adds.
"""

import jax.numpy as jnp

from moe_jax.dispatch.base import (Dispatched, combine_sorted, gather_assignments,
                                   inverse_permutation)


def dropless_dispatch(x, expert_ids, gates, experts, capacity_factor=None):
  del capacity_factor
  top_k = expert_ids.shape[1]
  flat_experts = expert_ids.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat_experts, stable=True)
  group_sizes = jnp.bincount(flat_experts, length=experts.num_experts).astype(jnp.int32)
  inverse = inverse_permutation(order)
  sorted_out = experts.ragged(gather_assignments(x, order, inverse, top_k), group_sizes)
  y = combine_sorted(sorted_out, order, gates, inverse)
  return Dispatched(y.astype(x.dtype), jnp.zeros((), jnp.float32))
