"""The interface every dispatcher implements.

A dispatcher takes one group of tokens x[T, D], the router's choice (expert ids and gates,
[T, K]), the experts (`SwiGLUExperts`, or a wrapper with the same methods that runs them on
other devices) and a capacity factor (ignored by dropless ones). It returns
y[T, D] = sum_k gate_k * expert_{id_k}(x) and the number of (token, slot) assignments it
dropped for lack of capacity.
"""

from typing import NamedTuple, Protocol

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
