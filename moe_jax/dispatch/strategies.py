"""The single-device dispatch strategies by name: `dispatch.strategy` picks one."""

from moe_jax.dispatch.base import Dispatcher
from moe_jax.dispatch.capacity import capacity_dispatch
from moe_jax.dispatch.dense import dense_dispatch
from moe_jax.dispatch.dropless import dropless_dispatch
from moe_jax.dispatch.reference import reference_dispatch

DISPATCHERS: dict[str, Dispatcher] = {
    "capacity": capacity_dispatch,
    "dense": dense_dispatch,
    "dropless": dropless_dispatch,
    "reference": reference_dispatch,
}

# Strategies that never drop: grouping cannot change their result, so they take all tokens
# of a batch at once (also: `jax.lax.ragged_dot` has no general vmap rule).
UNGROUPED = frozenset({"dropless", "reference"})
