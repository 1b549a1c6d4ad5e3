"""Load balancing: the aux-loss-free bias update and the auxiliary losses.

Shape letters: B sequences, S tokens per sequence, T tokens, E routed experts, K top-k.
Each loss returns its value *with* its coefficient applied, so the hand-checkable facts read
directly: Switch and sequence-wise losses equal alpha at uniform routing, and the z-loss is
coefficient * (ln E)^2 at zero logits. The MoE layers call them with coefficient 1 and the
training step applies the run's (`BalancingValues`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

BIAS_RULES = ("sign", "proportional")


class BalancingValues(NamedTuple):
  """The values of `BalancingSettings` (routing/settings.py) that the training step takes as
  arguments, scalars or arrays, so that runs differing only in them share one compiled step.
  The MoE layers compute their auxiliary losses without coefficients; the step weighs them
  (`weighted`, `aux_loss`) and moves the bias at `bias_update_rate` (0: not at all) until
  step `bias_freeze_step` (-1: never). The update rule stays a setting of the step."""

  bias_update_rate: Float[Array, ""]
  bias_freeze_step: Int[Array, ""]
  switch_loss_alpha: Float[Array, ""]
  sequence_loss_alpha: Float[Array, ""]
  z_loss_coef: Float[Array, ""]

  @classmethod
  def of(cls, settings) -> "BalancingValues":
    """A BalancingSettings' values as NumPy scalars (float32, the freeze step int32): one
    argument signature whatever the values, so one trace."""
    return cls(np.float32(settings.bias_update_rate), np.int32(settings.bias_freeze_step),
               np.float32(settings.switch_loss_alpha), np.float32(settings.sequence_loss_alpha),
               np.float32(settings.z_loss_coef))

  @classmethod
  def off(cls) -> "BalancingValues":
    """No bias update and no auxiliary loss."""
    return cls(np.float32(0), np.int32(-1), np.float32(0), np.float32(0), np.float32(0))

  def weighted(self, stats):
    """`stats` (layers/moe.py: MoEStats, any leading axes) with each loss times its
    coefficient: the losses as the training loss adds them and the logs show them."""
    return stats._replace(switch_loss=self.switch_loss_alpha * stats.switch_loss,
                          sequence_loss=self.sequence_loss_alpha * stats.sequence_loss,
                          z_loss=self.z_loss_coef * stats.z_loss)

  def aux_loss(self, stats) -> Float[Array, ""]:
    """The weighted auxiliary losses of `stats`, summed over every layer."""
    weighted = self.weighted(stats)
    return jnp.sum(weighted.switch_loss + weighted.sequence_loss + weighted.z_loss)

  def bias_rate(self, step) -> Float[Array, ""]:
    """The bias update's rate in the step after `step` steps: 0 from `bias_freeze_step` on."""
    frozen = (self.bias_freeze_step >= 0) & (step >= self.bias_freeze_step)
    return jnp.where(frozen, 0.0, self.bias_update_rate)


def relative_load(counts: Float[Array, "*L E"]) -> Float[Array, "*L E"]:
  """Each expert's load over the mean load of its layer (1.0 everywhere is perfect balance)."""
  counts = jnp.asarray(counts, jnp.float32)
  return counts / jnp.maximum(jnp.mean(counts, axis=-1, keepdims=True), 1e-9)


def update_balancing_bias(bias: Float[Array, "E"], counts: Float[Array, "E"], rate,
                          rule: str = "sign") -> Float[Array, "E"]:
  """Aux-loss-free balancing (DeepSeek-V3), from the *global* batch's expert counts.

  "sign":         b_i += rate * sign(mean load - load_i)
  "proportional": b_i += rate * (mean load - load_i), loads relative to the mean (so the
                  step does not grow with the batch size).
  """
  gap = 1.0 - relative_load(counts)        # mean load - load_i, with mean load = 1
  if rule == "sign":
    return bias + rate * jnp.sign(gap)
  if rule == "proportional":
    return bias + rate * gap
  raise ValueError(f"unknown bias update rule {rule!r}; expected {BIAS_RULES}")


def _normalized(probs: Float[Array, "... E"]) -> Float[Array, "... E"]:
  """Affinities over all routed experts summing to 1 (a no-op for softmax probabilities)."""
  return probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-20)


def switch_loss(probs: Float[Array, "T E"], counts: Float[Array, "E"], alpha: float,
                sum_over_shards=None) -> Float[Array, ""]:
  """Switch Transformer balance loss alpha * E * sum_i f_i P_i over a batch.

  f_i: share of the (token, slot) assignments that went to expert i (no gradient);
  P_i: mean over tokens of expert i's normalised score. Where each device holds a shard of
  the batch (inside a `jax.shard_map`), `sum_over_shards` (a psum over those mesh axes) makes
  f and P the whole batch's before their product: the loss is not a mean over tokens.
  """
  total = sum_over_shards or (lambda a: a)
  counts = total(counts)
  fraction = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  mean_prob = total(jnp.sum(_normalized(probs), axis=0)) / total(probs.shape[0])
  return alpha * probs.shape[-1] * jnp.sum(fraction * mean_prob)


def sequence_balance_loss(probs_BxSxE: Float[Array, "B S E"], counts_BxE: Float[Array, "B E"],
                          top_k: int, alpha: float) -> Float[Array, ""]:
  """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

  Per sequence: f_i = E / (K * S) * (tokens of the sequence that chose i), P_i = mean over
  the sequence of s'_i, the unbiased affinities normalised over all routed experts;
  loss = alpha * sum_i f_i P_i.
  """
  _, seq_len, num_experts = probs_BxSxE.shape
  f_BxE = jax.lax.stop_gradient(counts_BxE * num_experts / (top_k * seq_len))
  p_BxE = jnp.mean(_normalized(probs_BxSxE), axis=1)
  return alpha * jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


def z_loss(logits: Float[Array, "... E"], coefficient: float) -> Float[Array, ""]:
  """Router z-loss (ST-MoE): coefficient * mean over tokens of logsumexp(logits)^2."""
  return coefficient * jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))
