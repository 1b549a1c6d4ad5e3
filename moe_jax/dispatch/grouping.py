"""Which tokens are dispatched together: the one function an MoE layer calls.

* per sequence (`capacity`, `dense`): capacity, sorting and dropping happen within each
  sequence, so the layer shards along the batch like any other layer;
* flat (`dropless`, `reference`): nothing drops, so every token of the batch goes at once;
* expert parallel: the experts are sharded over the mesh axis `expert` and each device
  dispatches its own tokens as one group (expert_parallel.py, inside `jax.shard_map`);
* expert choice: each expert already holds its tokens, per sequence.

Shape letters: B batch, S sequence, D model width, K top-k, E experts, C tokens per expert.
"""

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from moe_jax import routing
from moe_jax.dispatch.expert_choice import expert_choice_dispatch
from moe_jax.dispatch.expert_parallel import expert_parallel_dispatch
from moe_jax.dispatch.experts import SwiGLUExperts
from moe_jax.dispatch.settings import DispatchSettings
from moe_jax.dispatch.strategies import DISPATCHERS, UNGROUPED


class LayerDispatch(Protocol):

  def __call__(self, x_BxSxD: Float[Array, "B S D"],
               decision: routing.Routing | routing.ExpertChoice,
               experts: SwiGLUExperts) -> tuple[Float[Array, "B S D"], Float[Array, ""]]:
    """(outputs weighted by the gates, fraction of the decision not computed: dropped
    (token, expert) assignments for token choice, tokens no expert took for expert choice).
    The decision holds one row per sequence: expert_ids/gates [B, S, K] or token_ids [B, E, C].
    Expert parallel `all_gather` also takes `replica_slots` (layers/moe.py: ReplicaSlots)."""


def make_dispatch(settings: DispatchSettings, expert_choice: bool = False) -> LayerDispatch:
  """The dispatch an MoE layer runs with `settings` (for an expert-choice router when
  `expert_choice`)."""
  if expert_choice:
    return _expert_choice
  if settings.expert_parallel != "none":
    return functools.partial(_expert_parallel, settings)
  if settings.strategy in UNGROUPED:
    return functools.partial(_flat, settings)
  return functools.partial(_per_sequence, settings)


def _dropped_fraction(dropped, expert_ids) -> Float[Array, ""]:
  return jnp.sum(dropped) / expert_ids.size


def _per_sequence(settings: DispatchSettings, x, decision, experts):
  dispatch = DISPATCHERS[settings.strategy]
  one = lambda x, ids, gates: dispatch(x, ids, gates.astype(x.dtype), experts,
                                       settings.capacity_factor)
  y, dropped = jax.vmap(one)(x, decision.expert_ids, decision.gates)
  return y, _dropped_fraction(dropped, decision.expert_ids)


def _flat(settings: DispatchSettings, x, decision, experts):
  batch, seq, width = x.shape
  flat = lambda a: a.reshape(batch * seq, a.shape[-1])
  dispatch = DISPATCHERS[settings.strategy]
  if settings.gates_before_down:
    dispatch = functools.partial(dispatch, gates_before_down=True)
  y, dropped = dispatch(flat(x), flat(decision.expert_ids), flat(decision.gates).astype(x.dtype),
                        experts, settings.capacity_factor)
  return y.reshape(batch, seq, width), _dropped_fraction(dropped, decision.expert_ids)


def _expert_parallel(settings: DispatchSettings, x, decision, experts, replica_slots=None):
  ragged = settings.expert_parallel == "ragged_all_to_all"
  y, dropped = expert_parallel_dispatch(settings.expert_parallel, x, decision.expert_ids,
                                        decision.gates.astype(x.dtype), experts,
                                        settings.ragged_capacity_factor if ragged
                                        else settings.capacity_factor,
                                        settings.expert_parallel_chunks,
                                        replica_slots)
  return y, _dropped_fraction(dropped, decision.expert_ids)


def _expert_choice(x, decision, experts):
  y = jax.vmap(lambda x, ids, g: expert_choice_dispatch(x, ids, g.astype(x.dtype), experts))(
      x, decision.token_ids, decision.gates)
  taken_BxSxE = jax.vmap(lambda ids: routing.expert_choice_mask(ids, x.shape[1]))(
      decision.token_ids)
  return y, jnp.mean(jnp.sum(taken_BxSxE, axis=-1) == 0)
