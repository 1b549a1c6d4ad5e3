"""Token dispatch: strategies one file each, all with the `Dispatcher` signature (base.py);
`make_dispatch` (grouping.py) gives the MoE layer the one function its settings ask for."""

from moe_jax.dispatch.base import Dispatched, Dispatcher, Experts
from moe_jax.dispatch.capacity import capacity_dispatch, expert_capacity
from moe_jax.dispatch.dense import dense_dispatch
from moe_jax.dispatch.dropless import dropless_dispatch
from moe_jax.dispatch.expert_choice import expert_choice_dispatch
from moe_jax.dispatch.experts import SwiGLUExperts
from moe_jax.dispatch.grouping import LayerDispatch, make_dispatch
from moe_jax.dispatch.reference import reference_dispatch
from moe_jax.dispatch.settings import DispatchSettings
from moe_jax.dispatch.strategies import DISPATCHERS, UNGROUPED

__all__ = ["DISPATCHERS", "UNGROUPED", "DispatchSettings", "Dispatched", "Dispatcher", "Experts",
           "LayerDispatch", "SwiGLUExperts", "capacity_dispatch", "dense_dispatch",
           "dropless_dispatch", "expert_capacity", "expert_choice_dispatch", "make_dispatch",
           "reference_dispatch"]
