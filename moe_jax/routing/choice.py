"""Router scores -> which experts each token uses, and with what gate.

Shape letters: T tokens, E routed experts, K experts per token, G expert groups, C capacity.

Token choice (`topk_route`): scores are `softmax(logits)` or `sigmoid(logits)`; the top-k is
chosen on score + bias, optionally only inside the best `topk_groups` of `num_groups` expert
groups (DeepSeek's group-limited routing); the gates are the chosen *unbiased* scores,
optionally renormalised to sum 1, times `route_scale`. So the balancing bias changes which
experts are picked, never how much a picked expert contributes.

Expert choice (`expert_choice_route`): each expert takes its C best tokens. A token's experts
then depend on the other tokens of its group, later ones included: it is not causal and does
not fit autoregressive decoding; use it for comparisons.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

SCORE_FUNCTIONS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")


class Routing(NamedTuple):
  """What a token-choice router decided for a group of tokens."""

  expert_ids: Int[Array, "T K"]     # chosen experts, best first
  gates: Float[Array, "T K"]        # weight of each chosen expert's output
  probs: Float[Array, "T E"]        # unbiased scores (softmax probabilities or sigmoid affinities)
  counts: Float[Array, "E"]         # (token, slot) assignments per expert, before capacity drops


class ExpertChoice(NamedTuple):
  """What an expert-choice router decided: each expert's tokens."""

  token_ids: Int[Array, "E C"]
  gates: Float[Array, "E C"]
  probs: Float[Array, "T E"]
  counts: Float[Array, "E"]         # tokens taken by each expert (= C for all)


def scores(logits: Float[Array, "T E"], score_function: str) -> Float[Array, "T E"]:
  logits = logits.astype(jnp.float32)
  if score_function == "sigmoid":
    return jax.nn.sigmoid(logits)
  if score_function == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  raise ValueError(f"unknown score function {score_function!r}; expected {SCORE_FUNCTIONS}")


def expert_counts(expert_ids: Int[Array, "T K"], num_experts: int) -> Float[Array, "E"]:
  """How many (token, slot) assignments each expert received."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)


def group_limited_mask(choice_scores: Float[Array, "T E"], unbiased: Float[Array, "T E"],
                       num_groups: int, topk_groups: int, group_score: str) -> Float[Array, "T E"]:
  """`choice_scores` with every expert outside each token's best `topk_groups` groups at -inf.

  A group's score is the sum of its two highest biased scores ("top2_sum", DeepSeek-V3) or
  its highest unbiased score ("max", DeepSeek-V2). Masked experts are -inf, below any score
  plus any finite bias, so no bias can bring them back.
  """
  num_tokens, num_experts = choice_scores.shape
  grouped = lambda s: s.reshape(num_tokens, num_groups, num_experts // num_groups)
  if group_score == "top2_sum":
    per_group = jnp.sum(jax.lax.top_k(grouped(choice_scores), 2)[0], axis=-1)
  elif group_score == "max":
    per_group = jnp.max(grouped(unbiased), axis=-1)
  else:
    raise ValueError(f"unknown group score {group_score!r}; expected {GROUP_SCORES}")
  _, best_groups = jax.lax.top_k(per_group, topk_groups)                       # [T, topk_groups]
  keep_TxG = jnp.zeros((num_tokens, num_groups), bool).at[
      jnp.arange(num_tokens)[:, None], best_groups].set(True)
  keep_TxE = jnp.repeat(keep_TxG, num_experts // num_groups, axis=1)
  return jnp.where(keep_TxE, choice_scores, -jnp.inf)


def top_k_indices(scores: Float[Array, "T E"], k: int) -> Int[Array, "T K"]:
  """The columns of each row's k highest scores, best first, ties to the lower column: what
  `jax.lax.top_k` returns, as k passes of argmax, each taking out the column it found. XLA
  sorts whole rows for top_k on GPU (64 experts, 32,768 tokens, k = 6 on an H200: 0.099 ms
  against 0.042). Needs k finite or NaN scores per row (every router's scores are; group
  masks leave at least k)."""
  columns = jnp.arange(scores.shape[-1])
  picked = []
  for _ in range(k):
    best = jnp.argmax(scores, axis=-1)
    picked.append(best)
    scores = jnp.where(columns == best[..., None], -jnp.inf, scores)
  return jnp.stack(picked, axis=-1).astype(jnp.int32)


def topk_route(logits: Float[Array, "T E"], bias: Float[Array, "E"] | None, *, top_k: int,
               score_function: str = "sigmoid", norm_topk_prob: bool = True,
               route_scale: float = 1.0,
               num_groups: int = 1, topk_groups: int = 1, group_score: str = "top2_sum") -> Routing:
  """Token-choice top-k routing (see the module docstring)."""
  probs = scores(logits, score_function)
  choice_scores = probs if bias is None else probs + bias.astype(probs.dtype)
  if num_groups > 1:
    choice_scores = group_limited_mask(choice_scores, probs, num_groups, topk_groups, group_score)
  expert_ids = top_k_indices(choice_scores, top_k)
  gates = jnp.take_along_axis(probs, expert_ids, axis=-1)
  if norm_topk_prob:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  return Routing(expert_ids, gates * route_scale, probs, expert_counts(expert_ids, probs.shape[-1]))


def expert_choice_route(logits: Float[Array, "T E"], capacity: int,
                        route_scale: float = 1.0) -> ExpertChoice:
  """Each expert takes the `capacity` tokens with the highest softmax probability for it."""
  probs = scores(logits, "softmax")
  gates, token_ids = jax.lax.top_k(probs.T, capacity)                           # [E, C]
  counts = jnp.full((probs.shape[-1],), float(capacity), jnp.float32)
  return ExpertChoice(token_ids, gates * route_scale, probs, counts)
