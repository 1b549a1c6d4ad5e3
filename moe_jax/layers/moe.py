"""The MoE layer: router + dispatch + routed experts, plus always-on shared experts.

Tokens are dispatched in groups of one sequence each: capacity, sorting and dropping happen
per sequence, so the layer shards along the batch like any other layer. With expert
parallelism the experts are sharded over the mesh axis `expert` and each device dispatches
all of its tokens as one group (moe_jax/dispatch/expert_parallel.py). The statistics it returns
are summed or averaged over the whole (global) batch, which is what the balancing bias needs.

Shape letters: B batch, S sequence, D model width, E routed experts, F expert width, K top-k.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from moe_jax import routing
from moe_jax.dispatch import DISPATCHERS, UNGROUPED, SwiGLUExperts, expert_capacity, expert_choice_dispatch
from moe_jax.dispatch.expert_parallel import expert_parallel_dispatch
from moe_jax.layers.mlp import SwiGLU, scaled_normal


class BalancingBias(nnx.Variable):
  """Per-expert routing bias of aux-loss-free balancing: state, not a parameter (no gradient)."""


class RouterSettings(NamedTuple):
  """How tokens are matched to experts (see moe_jax/routing/choice.py)."""

  router: str                  # "sigmoid" | "softmax" | "expert_choice"
  top_k: int
  normalize: bool              # renormalise the chosen gates to sum 1
  route_scale: float
  num_groups: int              # group-limited routing: experts split into this many groups...
  topk_groups: int             # ...of which each token may use the best this many
  group_score: str             # "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2)
  dispatcher: str
  capacity_factor: float
  expert_parallel: str = "none"  # "none" | "all_to_all" | "all_gather" | "ragged_all_to_all"
  expert_parallel_chunks: int = 1  # slices of each device's tokens dispatched separately


class MoEStats(NamedTuple):
  """Per-layer routing facts for one batch (aux losses already carry their coefficients)."""

  counts: Float[Array, "E"]            # assignments per expert, before capacity drops
  dropped_fraction: Float[Array, ""]   # assignments (token choice) or tokens (expert choice) not computed
  switch_loss: Float[Array, ""]
  sequence_loss: Float[Array, ""]
  z_loss: Float[Array, ""]
  entropy: Float[Array, ""]            # mean router entropy per token, nats
  coactivation: Float[Array, "E E"]    # tokens that used both experts i and j


class LossWeights(NamedTuple):
  switch_alpha: float = 0.0
  sequence_alpha: float = 0.0
  z_coefficient: float = 0.0


class MoE(nnx.Module):

  def __init__(self, d_model: int, num_experts: int, expert_dim: int, num_shared: int,
               settings: RouterSettings, loss_weights: LossWeights, dtype, rngs: nnx.Rngs,
               shared_expert_gate: bool = False):
    self.router_kernel = nnx.Param(scaled_normal(d_model)(rngs.params(), (d_model, num_experts)))
    self.balancing_bias = BalancingBias(jnp.zeros((num_experts,), jnp.float32))
    init_in, init_out = scaled_normal(d_model), scaled_normal(expert_dim)
    self.w_gate = nnx.Param(init_in(rngs.params(), (num_experts, d_model, expert_dim)))
    self.w_up = nnx.Param(init_in(rngs.params(), (num_experts, d_model, expert_dim)))
    self.w_down = nnx.Param(init_out(rngs.params(), (num_experts, expert_dim, d_model)))
    self.shared = SwiGLU(d_model, expert_dim * num_shared, dtype, rngs) if num_shared else None
    if num_shared and shared_expert_gate:   # Qwen2-MoE: shared output x sigmoid(x . w)
      self.shared_gate = nnx.Param(scaled_normal(d_model)(rngs.params(), (d_model, 1)))
    self.has_shared_gate = bool(num_shared and shared_expert_gate)
    self.num_experts, self.settings, self.loss_weights, self.dtype = (
        num_experts, settings, loss_weights, dtype)

  def router_logits(self, x_BxSxD) -> Float[Array, "B S E"]:
    return jnp.einsum("bsd,de->bse", x_BxSxD.astype(jnp.float32), self.router_kernel[...])

  def _experts(self) -> SwiGLUExperts:
    cast = lambda w: w[...].astype(self.dtype)
    with jax.named_scope("expert_weights"):
      return SwiGLUExperts(cast(self.w_gate), cast(self.w_up), cast(self.w_down))

  def __call__(self, x_BxSxD) -> tuple[Float[Array, "B S D"], MoEStats]:
    s, w = self.settings, self.loss_weights
    with jax.named_scope("router"):
      logits = self.router_logits(x_BxSxD)
    x = x_BxSxD.astype(self.dtype)
    if s.router == "expert_choice":
      y, probs, counts_BxE, chosen_BxSxE, dropped_fraction = self._expert_choice(x, logits)
    else:
      y, probs, counts_BxE, chosen_BxSxE, dropped_fraction = self._token_choice(x, logits)
    if self.shared is not None:
      with jax.named_scope("shared_experts"):
        shared = self.shared(x_BxSxD)
        if self.has_shared_gate:
          gate = jax.nn.sigmoid(x_BxSxD.astype(jnp.float32) @ self.shared_gate[...])
          shared = (shared * gate).astype(shared.dtype)
        y = y + shared
    counts = jnp.sum(counts_BxE, axis=0)
    probs_TxE = probs.reshape(-1, self.num_experts)
    stats = MoEStats(
        counts=counts, dropped_fraction=dropped_fraction,
        switch_loss=routing.switch_loss(probs_TxE, counts, w.switch_alpha),
        sequence_loss=routing.sequence_balance_loss(probs, counts_BxE, s.top_k, w.sequence_alpha),
        z_loss=routing.z_loss(logits, w.z_coefficient),
        entropy=routing.router_entropy(probs_TxE),
        coactivation=routing.coactivation(chosen_BxSxE.reshape(-1, self.num_experts)))
    return y, stats

  def route(self, logits_BxSxE) -> routing.Routing:
    """The token-choice decision per sequence (expert_ids [B,S,K], gates, probs, counts [B,E])."""
    s = self.settings
    if s.router == "expert_choice":
      raise ValueError("route() is for token-choice routers; expert choice decides per expert")
    bias = jax.lax.stop_gradient(self.balancing_bias[...])
    route = lambda l: routing.topk_route(
        l, bias, top_k=s.top_k, score_function=s.router, normalize=s.normalize,
        route_scale=s.route_scale, num_groups=s.num_groups, topk_groups=s.topk_groups,
        group_score=s.group_score)
    return jax.vmap(route)(logits_BxSxE)

  def _token_choice(self, x, logits):
    s = self.settings
    with jax.named_scope("router"):
      decision = self.route(logits)
    experts = self._experts()
    if s.expert_parallel != "none":   # each device's tokens form one group
      y, dropped = expert_parallel_dispatch(s.expert_parallel, x, decision.expert_ids,
                                            decision.gates.astype(self.dtype), experts,
                                            s.capacity_factor, s.expert_parallel_chunks)
    elif s.dispatcher in UNGROUPED:   # nothing drops: all tokens at once
      batch, seq, width = x.shape
      flat = lambda a: a.reshape(batch * seq, a.shape[-1])
      y, dropped = DISPATCHERS[s.dispatcher](flat(x), flat(decision.expert_ids),
                                             flat(decision.gates).astype(self.dtype), experts,
                                             s.capacity_factor)
      y = y.reshape(batch, seq, width)
    else:                             # each sequence forms one group
      dispatch = DISPATCHERS[s.dispatcher]
      per_sequence = lambda x, ids, gates: dispatch(
          x, ids, gates.astype(self.dtype), experts, s.capacity_factor)
      y, dropped = jax.vmap(per_sequence)(x, decision.expert_ids, decision.gates)
    chosen = routing.chosen_mask(decision.expert_ids, self.num_experts)
    dropped_fraction = jnp.sum(dropped) / decision.expert_ids.size
    return y, decision.probs, decision.counts, chosen, dropped_fraction

  def _expert_choice(self, x, logits):
    s = self.settings
    capacity = expert_capacity(x.shape[1], s.top_k, self.num_experts, s.capacity_factor)
    decision = jax.vmap(lambda l: routing.expert_choice_route(l, capacity, s.route_scale))(logits)
    experts = self._experts()
    y = jax.vmap(lambda x, ids, g: expert_choice_dispatch(x, ids, g.astype(self.dtype), experts))(
        x, decision.token_ids, decision.gates)
    chosen = jax.vmap(lambda ids: jnp.zeros((x.shape[1], self.num_experts)).at[
        ids, jnp.arange(self.num_experts)[:, None]].set(1.0))(decision.token_ids)
    dropped_fraction = jnp.mean(jnp.sum(chosen, axis=-1) == 0)
    return y, decision.probs, decision.counts, chosen, dropped_fraction
