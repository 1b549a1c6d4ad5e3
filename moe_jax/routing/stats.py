"""Routing statistics that researchers plot, as pure functions of counts and scores.

Shape letters: T tokens, E routed experts, K top-k.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def max_violation(counts: Float[Array, "... E"]) -> Float[Array, "..."]:
  """MaxVio = (max load - mean load) / mean load; 0 is perfect balance."""
  mean = jnp.mean(counts, axis=-1)
  return (jnp.max(counts, axis=-1) - mean) / jnp.maximum(mean, 1e-9)


def router_entropy(probs: Float[Array, "T E"]) -> Float[Array, ""]:
  """Mean over tokens of the entropy (nats) of the token's normalised router distribution."""
  p = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-20)
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def routing_confidence(counts: Float[Array, "... E"]) -> Float[Array, "..."]:
  """-sum_i p_i log q_i: p the uniform load 1/E, q the observed share of assignments.

  Equals ln E at perfect balance and grows as the load concentrates (q is floored at 1e-9,
  so a dead expert costs ln 1e9 / E rather than infinity).
  """
  q = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9)
  return -jnp.mean(jnp.log(jnp.maximum(q, 1e-9)), axis=-1)


def dead_experts(counts: Float[Array, "... E"]) -> Float[Array, "..."]:
  """How many experts received no token."""
  return jnp.sum(counts == 0, axis=-1).astype(jnp.float32)


def chosen_mask(expert_ids: Int[Array, "... K"], num_experts: int) -> Float[Array, "... E"]:
  """1 where a token uses an expert (token choice: its K experts)."""
  return jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=-2)


def expert_choice_mask(token_ids: Int[Array, "E C"], num_tokens: int) -> Float[Array, "T E"]:
  """1.0 where expert e took token t (expert choice: each expert's C tokens)."""
  num_experts = token_ids.shape[0]
  return jnp.zeros((num_tokens, num_experts)).at[token_ids, jnp.arange(num_experts)[:, None]].set(1.0)


def coactivation(chosen_TxE: Float[Array, "T E"]) -> Float[Array, "E E"]:
  """C[i, j]: tokens that used both i and j (C[i, i]: tokens that used i), from a 0/1 mask."""
  return chosen_TxE.T @ chosen_TxE
