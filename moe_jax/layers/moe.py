"""The MoE layer: router + dispatch + routed experts, plus always-on shared experts.

The layer reads two settings objects: the router's (which experts each token uses) and the
dispatch's, from which `make_dispatch` gives the one function that moves tokens (per
sequence, all at once, or expert parallel over the mesh axis `expert`;
moe_jax/dispatch/grouping.py). Its balancing losses come without their coefficients, which
the training step applies (routing.BalancingValues). The statistics it returns are summed or
averaged over the whole (global) batch, which is what the balancing bias needs; inside a
shard_map whose devices each hold a shard of the batch, over that shard (the caller sums
them), except the Switch loss, a product of two batch means, which sums its means over the
shards first.

Shape letters: B batch, S sequence, D model width, E routed experts, F expert width, K top-k.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from moe_jax import routing
from moe_jax.dispatch import DispatchSettings, SwiGLUExperts, expert_capacity, make_dispatch
from moe_jax.dispatch.expert_parallel import TOKEN_AXES
from moe_jax.layers.mlp import SwiGLU, scaled_normal
from moe_jax.layers.params import KeySource, named, param
from moe_jax.manual_axes import varying_axes
from moe_jax.routing import RouterSettings


def _sum_over_token_shards(x_BxSxD):
  """Inside a `jax.shard_map` whose devices each hold a shard of the batch (a pipeline stage
  with expert parallelism): a psum over the manual token axes `x` is split over, else None
  (the batch is whole here: the compiler splits it)."""
  axes = tuple(a for a in TOKEN_AXES if a in varying_axes(x_BxSxD))
  return functools.partial(jax.lax.psum, axis_name=axes) if axes else None


class RoutingState(nnx.Variable):
  """State of the routing that is not a parameter (no gradient, not seen by the optimizer),
  updated by the training step from the batch's global expert counts."""


class BalancingBias(RoutingState):
  """Per-expert routing bias of aux-loss-free balancing."""


class ReplicaSlots(RoutingState):
  """[E, R]: the experts held in each expert-parallel rank's R spare slots (row p: rank p's;
  rows past the mesh's `expert` size unused; -1 empty): replicas of hot experts."""


class ReplicaCounts(RoutingState):
  """[E]: assignments per expert since the replicas were last planned (the next plan's input)."""


class RoutingDecision(nnx.Intermediate):
  """The router's last decision, kept when the layer's `keep_decision` is set (analysis)."""


class MoEStats(NamedTuple):
  """Per-layer routing facts for one batch. The aux losses are without their coefficients
  (coefficient 1): the training step weighs them (routing.BalancingValues), so that runs
  differing only in the coefficients share one compiled step."""

  counts: Float[Array, "E"]            # assignments per expert, before capacity drops
  dropped_fraction: Float[Array, ""]   # assignments (token choice) or tokens (expert choice) not computed
  switch_loss: Float[Array, ""]
  sequence_loss: Float[Array, ""]
  z_loss: Float[Array, ""]
  entropy: Float[Array, ""]            # mean router entropy per token, nats
  coactivation: Float[Array, "E E"]    # tokens that used both experts i and j

  def over_slices(self, slices: int) -> "MoEStats":
    """Statistics summed over `slices` equal slices of a batch -> the whole batch's: counts
    and co-activations are sums over tokens and stay so, the rest are means."""
    summed = ("counts", "coactivation")
    return self._replace(**{name: getattr(self, name) / slices
                            for name in self._fields if name not in summed})


class MoE(nnx.Module):

  def __init__(self, d_model: int, num_experts: int, expert_dim: int, num_shared: int,
               rngs: KeySource, *, router: RouterSettings = RouterSettings(),
               dispatch: DispatchSettings = DispatchSettings(), dtype=jnp.float32,
               shared_expert_gate: bool = False):
    self.router_kernel = param(scaled_normal(d_model)(rngs.params(), (d_model, num_experts)),
                               "embed", "router")
    self.balancing_bias = named(BalancingBias, jnp.zeros((num_experts,), jnp.float32), "router")
    if dispatch.expert_replicas:   # an empty plan; the training step replans
      empty = jnp.full((num_experts, dispatch.expert_replicas), -1, jnp.int32)
      self.replica_slots = named(ReplicaSlots, empty, None, None)
      self.replica_counts = named(ReplicaCounts, jnp.zeros((num_experts,), jnp.float32), None)
    init_in, init_out = scaled_normal(d_model), scaled_normal(expert_dim)
    self.w_gate = param(init_in(rngs.params(), (num_experts, d_model, expert_dim)),
                        "experts", "embed", "mlp")
    self.w_up = param(init_in(rngs.params(), (num_experts, d_model, expert_dim)),
                      "experts", "embed", "mlp")
    self.w_down = param(init_out(rngs.params(), (num_experts, expert_dim, d_model)),
                        "experts", "mlp", "embed")
    self.shared = SwiGLU(d_model, expert_dim * num_shared, dtype, rngs) if num_shared else None
    if num_shared and shared_expert_gate:   # Qwen2-MoE: shared output x sigmoid(x . w)
      self.shared_gate = param(scaled_normal(d_model)(rngs.params(), (d_model, 1)), "embed", None)
    self.has_shared_gate = bool(num_shared and shared_expert_gate)
    self.num_experts, self.dtype = num_experts, dtype
    self.router, self.dispatch = router, dispatch
    self.keep_decision = False   # set on a model to read each layer's `decision` after a forward

  def router_logits(self, x_BxSxD) -> Float[Array, "B S E"]:
    return jnp.einsum("bsd,de->bse", x_BxSxD.astype(jnp.float32), self.router_kernel[...])

  def _experts(self) -> SwiGLUExperts:
    # The master (float32) weights: each product casts them (SwiGLUExperts.swiglu), FP8 and
    # Mosaic kernels inside their custom VJPs, whose weight gradients come out in float32.
    return SwiGLUExperts(self.w_gate[...], self.w_up[...], self.w_down[...],
                         self.dispatch.grouped_matmul, self.dispatch.fp8_experts)

  def __call__(self, x_BxSxD) -> tuple[Float[Array, "B S D"], MoEStats]:
    r = self.router
    with jax.named_scope("router"):
      logits = self.router_logits(x_BxSxD)
      decision = self.decide(logits)
    if self.keep_decision:
      self.decision = RoutingDecision(decision)
    dispatch = make_dispatch(self.dispatch, r.expert_choice)
    replicas = {"replica_slots": self.replica_slots[...]} if self.dispatch.expert_replicas else {}
    y, dropped_fraction = dispatch(x_BxSxD.astype(self.dtype), decision, self._experts(),
                                   **replicas)
    if self.shared is not None:
      with jax.named_scope("shared_experts"):
        shared = self.shared(x_BxSxD)
        if self.has_shared_gate:
          gate = jax.nn.sigmoid(x_BxSxD.astype(jnp.float32) @ self.shared_gate[...])
          shared = (shared * gate).astype(shared.dtype)
        y = y + shared
    if r.expert_choice:
      chosen = jax.vmap(lambda ids: routing.expert_choice_mask(ids, x_BxSxD.shape[1]))(
          decision.token_ids)
    else:
      chosen = routing.chosen_mask(decision.expert_ids, self.num_experts)
    counts_BxE, probs = decision.counts, decision.probs
    counts = jnp.sum(counts_BxE, axis=0)
    probs_TxE = probs.reshape(-1, self.num_experts)
    stats = MoEStats(
        counts=counts, dropped_fraction=dropped_fraction,
        switch_loss=routing.switch_loss(probs_TxE, counts, 1.0, _sum_over_token_shards(x_BxSxD)),
        sequence_loss=routing.sequence_balance_loss(probs, counts_BxE, r.top_k, 1.0),
        z_loss=routing.z_loss(logits, 1.0),
        entropy=routing.router_entropy(probs_TxE),
        coactivation=routing.coactivation(chosen.reshape(-1, self.num_experts)))
    return y, stats

  def decide(self, logits_BxSxE) -> routing.Routing | routing.ExpertChoice:
    """The router's decision per sequence: each token's experts (token choice) or each
    expert's tokens (expert choice, as many as the dispatch capacity gives)."""
    r = self.router
    if r.expert_choice:
      capacity = expert_capacity(logits_BxSxE.shape[1], r.top_k, self.num_experts,
                                 self.dispatch.capacity_factor)
      return jax.vmap(lambda l: routing.expert_choice_route(l, capacity, r.route_scale))(
          logits_BxSxE)
    return self.route(logits_BxSxE)

  def route(self, logits_BxSxE) -> routing.Routing:
    """The token-choice decision per sequence (expert_ids [B,S,K], gates, probs, counts [B,E])."""
    r = self.router
    if r.expert_choice:
      raise ValueError("route() is for token-choice routers; expert choice decides per expert")
    bias = jax.lax.stop_gradient(self.balancing_bias[...])
    return jax.vmap(lambda l: routing.topk_route(l, bias, **r.values()))(logits_BxSxE)
