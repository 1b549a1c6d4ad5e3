"""Routing as pure functions: router logits -> top-k choice -> gates, balancing, statistics.

Shape letters: T tokens, E routed experts, K experts chosen per token.

Two routers:
  * `sigmoid_topk` (DeepSeek-V3): scores s = sigmoid(logits); the top-k is chosen on s + bias,
    while the gates are the chosen *unbiased* scores, renormalised to sum 1 (optional), times
    `route_scale`. The bias is balancing state updated by `update_balancing_bias`, never by a
    gradient, so it steers which experts are picked without touching what they contribute.
  * `softmax_topk` (Switch / GShard / DeepSeek-V2): p = softmax(logits); top-k of p; gates are
    the chosen probabilities (renormalised only if asked) times `route_scale`; load balance
    comes from `switch_aux_loss`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class Routing(NamedTuple):
  """What a router decided for a group of tokens."""

  expert_ids: Int[Array, "T K"]     # chosen experts, best first
  gates: Float[Array, "T K"]        # weight of each chosen expert's output
  probs: Float[Array, "T E"]        # unbiased router scores/probabilities (for aux losses, stats)
  counts: Float[Array, "E"]         # tokens assigned to each expert (before any capacity drop)


def expert_counts(expert_ids: Int[Array, "T K"], num_experts: int) -> Float[Array, "E"]:
  """How many (token, slot) assignments each expert received."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)


def _finish(probs, choice_scores, bias, top_k, route_scale, normalize):
  """Picks the top-k of `choice_scores` (+ bias) and reads the gates off unbiased `probs`."""
  if bias is not None:
    choice_scores = choice_scores + bias.astype(choice_scores.dtype)
  _, expert_ids = jax.lax.top_k(choice_scores, top_k)
  gates = jnp.take_along_axis(probs, expert_ids, axis=-1)
  if normalize:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  gates = gates * route_scale
  return Routing(expert_ids, gates, probs, expert_counts(expert_ids, probs.shape[-1]))


def sigmoid_topk(logits: Float[Array, "T E"], bias: Float[Array, "E"] | None, top_k: int,
                 route_scale: float = 1.0, normalize: bool = True) -> Routing:
  """DeepSeek-V3 routing: choose on sigmoid(logits) + bias, gate with the unbiased scores."""
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  return _finish(scores, scores, bias, top_k, route_scale, normalize)


def softmax_topk(logits: Float[Array, "T E"], bias: Float[Array, "E"] | None, top_k: int,
                 route_scale: float = 1.0, normalize: bool = False) -> Routing:
  """Top-k of softmax(logits); gates are the chosen probabilities (renormalised if asked)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return _finish(probs, probs, bias, top_k, route_scale, normalize)


ROUTERS: dict[str, Callable[..., Routing]] = {"sigmoid": sigmoid_topk, "softmax": softmax_topk}


def switch_aux_loss(probs: Float[Array, "T E"], counts: Float[Array, "E"]) -> Float[Array, ""]:
  """Switch Transformer balance loss E * sum_i f_i * P_i (multiply by alpha outside).

  f_i is the fraction of assignments that went to expert i (counts / sum counts, no gradient),
  P_i the mean over tokens of expert i's score normalised over experts (a no-op for softmax
  probabilities; sigmoid scores are divided by their sum). Equals 1 for uniform routing.
  """
  num_experts = probs.shape[-1]
  fraction = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  mean_prob = jnp.mean(probs / jnp.sum(probs, axis=-1, keepdims=True), axis=0)
  return num_experts * jnp.sum(fraction * mean_prob)


def update_balancing_bias(bias: Float[Array, "E"], counts: Float[Array, "E"],
                          rate: float) -> Float[Array, "E"]:
  """Aux-loss-free balancing (DeepSeek-V3): b_i += rate * sign(mean load - load_i).

  `counts` must be the expert counts of the whole global batch (every token-splitting mesh
  axis summed): under `jax.jit` on global arrays they are, by construction.
  """
  load = counts.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load) - load)


def max_violation(counts: Float[Array, "E"]) -> Float[Array, ""]:
  """MaxVio = (max load - mean load) / mean load; 0 is perfect balance."""
  mean = jnp.mean(counts)
  return (jnp.max(counts) - mean) / jnp.maximum(mean, 1e-9)
