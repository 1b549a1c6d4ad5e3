"""The MoE layer: router + dispatch + routed experts, plus always-on shared experts.

Tokens are routed in groups of one sequence each: capacity, sorting and dropping happen per
sequence, so the layer shards along the batch like any other layer. The per-expert counts it
reports are summed over the whole (global) batch, which is what the balancing bias update needs.

Shape letters: B batch, S sequence, D model width, E routed experts, F expert width, K top-k.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from moe_jax import routing
from moe_jax.dispatch import DISPATCHERS
from moe_jax.layers.mlp import SwiGLU, scaled_normal, swiglu


class BalancingBias(nnx.Variable):
  """Per-expert routing bias of aux-loss-free balancing: state, not a parameter (no gradient)."""


class MoEStats(NamedTuple):
  counts: Float[Array, "E"]      # assignments per expert over the whole batch, before drops
  dropped: Float[Array, ""]      # assignments dropped for lack of capacity
  aux_loss: Float[Array, ""]     # Switch balance loss (before alpha)


class MoE(nnx.Module):

  def __init__(self, d_model: int, num_experts: int, expert_dim: int, num_shared: int,
               top_k: int, router: str, route_scale: float, normalize_gates: bool,
               dispatcher: str, capacity_factor: float, dtype, rngs: nnx.Rngs):
    self.router_kernel = nnx.Param(scaled_normal(d_model)(rngs.params(), (d_model, num_experts)))
    self.balancing_bias = BalancingBias(jnp.zeros((num_experts,), jnp.float32))
    init_in, init_out = scaled_normal(d_model), scaled_normal(expert_dim)
    self.w_gate = nnx.Param(init_in(rngs.params(), (num_experts, d_model, expert_dim)))
    self.w_up = nnx.Param(init_in(rngs.params(), (num_experts, d_model, expert_dim)))
    self.w_down = nnx.Param(init_out(rngs.params(), (num_experts, expert_dim, d_model)))
    self.shared = SwiGLU(d_model, expert_dim * num_shared, dtype, rngs) if num_shared else None
    self.num_experts, self.top_k = num_experts, top_k
    self.router, self.route_scale, self.normalize_gates = router, route_scale, normalize_gates
    self.dispatcher, self.capacity_factor, self.dtype = dispatcher, capacity_factor, dtype

  def route(self, x_BxSxD) -> routing.Routing:
    """Router logits in float32 -> the routing decision for every token, [B, S, ...]."""
    logits = jnp.einsum("bsd,de->bse", x_BxSxD.astype(jnp.float32), self.router_kernel[...])
    bias = jax.lax.stop_gradient(self.balancing_bias[...])
    route_one = lambda l: routing.ROUTERS[self.router](
        l, bias, self.top_k, self.route_scale, self.normalize_gates)
    return jax.vmap(route_one)(logits)

  def __call__(self, x_BxSxD) -> tuple[Float[Array, "B S D"], MoEStats]:
    decision = self.route(x_BxSxD)
    cast = lambda w: w[...].astype(self.dtype)
    w_gate, w_up, w_down = cast(self.w_gate), cast(self.w_up), cast(self.w_down)
    experts = lambda buffer_ExCxD: swiglu(buffer_ExCxD, w_gate, w_up, w_down)
    dispatch = DISPATCHERS[self.dispatcher]
    per_sequence = lambda x, ids, gates: dispatch(
        x, ids, gates.astype(self.dtype), experts, self.num_experts, self.capacity_factor)
    y, dropped = jax.vmap(per_sequence)(x_BxSxD.astype(self.dtype), decision.expert_ids,
                                        decision.gates)
    if self.shared is not None:
      y = y + self.shared(x_BxSxD)
    counts = jnp.sum(decision.counts, axis=0)
    probs_TxE = decision.probs.reshape(-1, self.num_experts)
    stats = MoEStats(counts, jnp.sum(dropped), routing.switch_aux_loss(probs_TxE, counts))
    return y, stats
