"""RMSNorm."""

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.params import param


def rms_norm(x, scale, eps: float):
  """x / rms(x) * scale over the last axis, in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 and returned in the input's dtype."""

  def __init__(self, dim: int, eps: float, axis: str = "embed"):
    self.scale = param(jnp.ones((dim,), jnp.float32), axis)
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)
