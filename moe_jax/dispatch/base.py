"""The interface every dispatcher implements.

A dispatcher takes one group of tokens x[T, D], the router's choice (expert ids and gates,
[T, K]) and `experts`, a function running all E expert FFNs on a buffer [E, C, D] -> [E, C, D].
It returns y[T, D] = sum_k gate_k * expert_{id_k}(x) and the number of (token, slot)
assignments it dropped for lack of capacity.
"""

from typing import Callable, NamedTuple, Protocol

from jaxtyping import Array, Float, Int

ExpertsFn = Callable[[Float[Array, "E C D"]], Float[Array, "E C D"]]


class Dispatched(NamedTuple):
  output: Float[Array, "T D"]
  dropped: Float[Array, ""]    # assignments over capacity, not computed


class Dispatcher(Protocol):
  def __call__(self, x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
               gates: Float[Array, "T K"], experts: ExpertsFn, num_experts: int,
               capacity_factor: float) -> Dispatched: ...
