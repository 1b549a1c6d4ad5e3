"""Dropless dispatch: assignments sorted by expert, one grouped matmul over ragged groups.

Nothing is dropped and no capacity is padded. The grouped matmuls are the experts' `ragged`
method: GPU kernels on GPU (moe_jax/kernels/grouped_matmul.py), `jax.lax.ragged_dot`
elsewhere. The permutation into expert order and back are gathers whose gradients are gathers
too (dispatch/base.py), not scatter-adds.

With `gates_before_down`, each row's gate scales its expert's activations before the down
projection (which is linear, so the output is the same), as Megatron-Core's weighted SwiGLU
does, instead of the expert's output after it: the backward then keeps no [T x K, D] expert
outputs for the gates' gradient (a sum over the expert width F from the activations it keeps
anyway) and the combine is a plain sum over the top k. On one H200 at the 1.29B benchmark
model: 5.3 GiB less memory, 1.2 ms more per 150 ms step (docs/dispatch.md).
"""

import jax.numpy as jnp

from moe_jax.dispatch.base import (Dispatched, combine_sorted, gather_assignments, group_sizes,
                                   inverse_permutation, permute_rows, sum_sorted)


def dropless_dispatch(x, expert_ids, gates, experts, capacity_factor=None,
                      gates_before_down: bool = False):
  del capacity_factor
  top_k = expert_ids.shape[1]
  flat_experts = expert_ids.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat_experts, stable=True)
  sizes = group_sizes(flat_experts, experts.num_experts)
  inverse = inverse_permutation(order)
  rows = gather_assignments(x, order, inverse, top_k)
  if gates_before_down:
    sorted_gates = permute_rows(gates.reshape(-1, 1), order, inverse)[:, 0]
    y = sum_sorted(experts.ragged(rows, sizes, row_weights=sorted_gates), order, inverse,
                   top_k)
  else:
    y = combine_sorted(experts.ragged(rows, sizes), order, gates, inverse)
  return Dispatched(y.astype(x.dtype), jnp.zeros((), jnp.float32))
