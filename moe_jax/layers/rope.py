"""Rotary position embeddings, with YaRN's context extension.

RoPE rotates channel pairs of queries and keys by position x inverse frequency, so q . k
depends only on the distance between positions. Two layouts of the pairs exist in released
models: half-split, (i, i + H/2) (Llama, Mixtral, Qwen, OLMoE), and interleaved, (2i, 2i + 1)
(DeepSeek's MLA in DeepSeek's own code).

YaRN (Peng et al. 2023; DeepSeek-V2/V3) stretches the slow frequencies by `factor` and keeps
the fast ones, ramping between the dimensions that turn beta_fast and beta_slow times over
the original context; with it the attention logits are scaled (the "mscale" terms).
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "yarn")


class Rope(NamedTuple):
  theta: float
  scaling: str = "none"         # "none" | "yarn"
  factor: float = 1.0           # yarn: context extension factor
  original_max_len: int = 4096  # yarn: the context the model was trained on first
  beta_fast: float = 32.0       # yarn: dimensions turning more often than this are kept
  beta_slow: float = 1.0        # yarn: ... less often than this are divided by `factor`
  mscale: float = 1.0           # yarn: see `yarn_mscale`
  mscale_all_dim: float = 1.0


def yarn_mscale(factor: float, mscale: float) -> float:
  """0.1 * mscale * ln(factor) + 1 (1 when the factor does not extend the context)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_len: int) -> float:
  """The (fractional) pair index whose frequency turns `rotations` times over max_len."""
  return dim * math.log(max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, rope: Rope) -> np.ndarray:
  """[dim / 2] float32 inverse frequencies theta^(-2i/dim), YaRN-blended when asked."""
  inv_freq = 1.0 / rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if rope.scaling == "yarn":
    low = max(math.floor(_correction_dim(rope.beta_fast, dim, rope.theta, rope.original_max_len)), 0)
    high = min(math.ceil(_correction_dim(rope.beta_slow, dim, rope.theta, rope.original_max_len)),
               dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)  # 0: keep, 1: stretch
    inv_freq = inv_freq * (1 - ramp) + inv_freq / rope.factor * ramp
  return inv_freq.astype(np.float32)


def rotation_scale(rope: Rope) -> float:
  """The factor YaRN puts on cos and sin (so on the rotated channels of q and k)."""
  if rope.scaling != "yarn":
    return 1.0
  return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)


def softmax_scale_factor(rope: Rope) -> float:
  """DeepSeek's MLA multiplies its softmax scale by yarn_mscale(factor, mscale_all_dim)^2."""
  return yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2 if rope.scaling == "yarn" else 1.0


def rotate(x_BxSxNxH, positions_S, inv_freq_half: np.ndarray, scale: float = 1.0,
           interleaved: bool = False):
  """x with each channel pair rotated by position * inv_freq (computed in float32)."""
  angle_SxHalf = positions_S.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq_half)[None, :]
  sin = (jnp.sin(angle_SxHalf) * scale)[:, None, :]
  cos = (jnp.cos(angle_SxHalf) * scale)[:, None, :]
  x = x_BxSxNxH.astype(jnp.float32)
  if interleaved:
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxH.dtype)
