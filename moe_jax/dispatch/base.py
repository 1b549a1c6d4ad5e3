"""The interface every dispatcher implements.

A dispatcher takes one group of tokens x[T, D], the router's choice (expert ids and gates,
[T, K]), the experts (`SwiGLUExperts`, or a wrapper with the same methods that runs them on
other devices) and a capacity factor (ignored by dropless ones). It returns
y[T, D] = sum_k gate_k * expert_{id_k}(x) and the number of (token, slot) assignments it
dropped for lack of capacity.
"""

from typing import NamedTuple, Protocol

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


def combine_sorted(sorted_rows: Float[Array, "N D"], order: Int[Array, "N"],
                   gates: Float[Array, "T K"]) -> Float[Array, "T D"]:
  """Rows in expert-sorted order (row i belongs to flat assignment order[i] = t * K + k) ->
  y[t] = sum_k gates[t, k] * row of (t, k), in float32."""
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  rows_TxKxD = sorted_rows[inverse].reshape(*gates.shape, -1)
  return jnp.einsum("tkd,tk->td", rows_TxKxD.astype(jnp.float32), gates.astype(jnp.float32))
