"""Token dispatch strategies, one file each, all with the `Dispatcher` signature (base.py)."""

from moe_jax.dispatch.base import Dispatched, Dispatcher, Experts
from moe_jax.dispatch.capacity import capacity_dispatch, expert_capacity
from moe_jax.dispatch.dense import dense_dispatch
from moe_jax.dispatch.dropless import dropless_dispatch
from moe_jax.dispatch.expert_choice import expert_choice_dispatch
from moe_jax.dispatch.experts import SwiGLUExperts
from moe_jax.dispatch.reference import reference_dispatch

DISPATCHERS: dict[str, Dispatcher] = {
    "capacity": capacity_dispatch,
    "dense": dense_dispatch,
    "dropless": dropless_dispatch,
    "reference": reference_dispatch,
}

# Dispatchers that never drop: grouping cannot change their result, so they take all tokens
# of a batch at once (also: `jax.lax.ragged_dot` has no general vmap rule).
UNGROUPED = frozenset({"dropless", "reference"})

__all__ = ["DISPATCHERS", "UNGROUPED", "Dispatched", "Dispatcher", "Experts", "SwiGLUExperts",
           "capacity_dispatch", "dense_dispatch", "dropless_dispatch", "expert_capacity",
           "expert_choice_dispatch", "reference_dispatch"]
