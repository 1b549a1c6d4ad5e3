"""The interface every dispatcher implements.

A dispatcher takes one group of tokens x[T, D], the router's choice (expert ids and gates,
[T, K]), the experts (`SwiGLUExperts`, or a wrapper with the same methods that runs them on
other devices) and a capacity factor (ignored by dropless ones). It returns
y[T, D] = sum_k gate_k * expert_{id_k}(x) and the number of (token, slot) assignments it
dropped for lack of capacity.
"""

import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int



class Experts(Protocol):
  """E expert FFNs: on a padded buffer [E, C, D], or on rows sorted into ragged groups."""

  @property
  def num_experts(self) -> int: ...

  def __call__(self, buffer: Float[Array, "E C D"]) -> Float[Array, "E C D"]: ...

  def ragged(self, rows: Float[Array, "N D"], group_sizes: Int[Array, "E"]) -> Float[Array, "N D"]: ...


class Dispatched(NamedTuple):
  output: Float[Array, "T D"]
  dropped: Float[Array, ""]    # assignments over capacity, not computed


class Dispatcher(Protocol):
  def __call__(self, x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
               gates: Float[Array, "T K"], experts: Experts, capacity_factor: float) -> Dispatched: ...


def inverse_permutation(order: Int[Array, "N"]) -> Int[Array, "N"]:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


@jax.custom_vjp
def permute_rows(rows: Float[Array, "N D"], index: Int[Array, "N"], inverse: Int[Array, "N"]):
  """rows[index] for a permutation `index` with inverse `inverse`. Its gradient is a gather by
  the inverse rather than XLA's generic scatter-add (slow on GPU)."""
  return rows[index]


permute_rows.defvjp(lambda rows, index, inverse: (rows[index], inverse),
                    lambda inverse, d: (d[inverse], None, None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_assignments(x: Float[Array, "T D"], order: Int[Array, "N"], inverse: Int[Array, "N"],
                       top_k: int) -> Float[Array, "N D"]:
  """x[order // K]: the token of each assignment, in `order` (a permutation of the T * K flat
  assignments t * K + k). The gradient gathers by `inverse` and sums each token's K rows."""
  return x[order // top_k]


def _gather_assignments_backward(top_k, inverse, d):
  per_assignment = d[inverse].reshape(inverse.shape[0] // top_k, top_k, -1)
  return per_assignment.sum(axis=1, dtype=jnp.float32).astype(d.dtype), None, None


gather_assignments.defvjp(lambda x, order, inverse, top_k: (x[order // top_k], inverse),
                          _gather_assignments_backward)


def combine_sorted(sorted_rows: Float[Array, "N D"], order: Int[Array, "N"],
                   gates: Float[Array, "T K"], inverse: Int[Array, "N"] | None = None
                   ) -> Float[Array, "T D"]:
  """Rows in expert-sorted order (row i belongs to flat assignment order[i] = t * K + k) ->
  y[t] = sum_k gates[t, k] * row of (t, k), in float32."""
  inverse = inverse_permutation(order) if inverse is None else inverse
  rows_TxKxD = permute_rows(sorted_rows, inverse, order).reshape(*gates.shape, -1)
  return jnp.einsum("tkd,tk->td", rows_TxKxD.astype(jnp.float32), gates.astype(jnp.float32))
