"""Token dispatch strategies, one file each, all with the `Dispatcher` signature (base.py)."""

from moe_jax.dispatch.base import Dispatched, Dispatcher, ExpertsFn
from moe_jax.dispatch.capacity import capacity_dispatch, expert_capacity
from moe_jax.dispatch.expert_choice import expert_choice_dispatch
from moe_jax.dispatch.reference import reference_dispatch

DISPATCHERS: dict[str, Dispatcher] = {
    "capacity": capacity_dispatch,
    "reference": reference_dispatch,
}

__all__ = ["DISPATCHERS", "Dispatched", "Dispatcher", "ExpertsFn", "capacity_dispatch",
           "expert_capacity", "expert_choice_dispatch", "reference_dispatch"]
