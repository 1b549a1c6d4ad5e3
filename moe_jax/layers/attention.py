"""Causal self-attention with rotary position embeddings and grouped-query heads.

Shape letters: B batch, S sequence, D model width, N query heads, G key/value heads, H head dim.
"""

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.mlp import scaled_normal

IMPLEMENTATIONS = ("auto", "cudnn", "xla")
_choice = ["auto"]


@contextlib.contextmanager
def implementation(name: str):
  """Within this block attention uses `name`: "cudnn" (fused flash attention, NVIDIA GPUs,
  bf16/fp16), "xla" (scores materialised; any backend) or "auto" (cudnn where it applies, xla
  elsewhere). Read at trace time."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; choose from {IMPLEMENTATIONS}")
  previous, _choice[0] = _choice[0], name
  try:
    yield
  finally:
    _choice[0] = previous


def chosen_implementation(dtype, head_dim: int) -> str:
  """The path `jax.nn.dot_product_attention` takes: cuDNN's fused kernel on a GPU for 16-bit
  inputs and head dims it supports (jax's own default is the XLA path, which writes the
  [B, N, S, S] scores to memory several times in each pass)."""
  if _choice[0] != "auto":
    return _choice[0]
  fused = (jax.default_backend() == "gpu" and "rocm" not in jax.devices()[0].client.platform_version
           and jnp.dtype(dtype).itemsize == 2
           and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused else "xla"


def rotary(x_BxSxNxH, positions_S, theta: float):
  """Rotates channel pairs (i, i + H/2) by position * theta^(-2i/H) (RoPE, half-split layout)."""
  half = x_BxSxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_SxH = positions_S.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin, cos = jnp.sin(angle_SxH)[:, None, :], jnp.cos(angle_SxH)[:, None, :]
  x1, x2 = jnp.split(x_BxSxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxH.dtype)


class Attention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               rope_theta: float, dtype, rngs: nnx.Rngs):
    init = scaled_normal(d_model)
    self.w_q = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim)))
    self.w_k = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim)))
    self.w_v = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim)))
    self.w_o = nnx.Param(scaled_normal(num_heads * head_dim)(
        rngs.params(), (num_heads, head_dim, d_model)))
    self.rope_theta, self.dtype = rope_theta, dtype

  def __call__(self, x_BxSxD, positions_S):
    x = x_BxSxD.astype(self.dtype)
    cast = lambda w: w[...].astype(self.dtype)
    q = rotary(jnp.einsum("bsd,dnh->bsnh", x, cast(self.w_q)), positions_S, self.rope_theta)
    k = rotary(jnp.einsum("bsd,dgh->bsgh", x, cast(self.w_k)), positions_S, self.rope_theta)
    v = jnp.einsum("bsd,dgh->bsgh", x, cast(self.w_v))
    out_BxSxNxH = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=chosen_implementation(q.dtype, q.shape[-1]))
    return jnp.einsum("bsnh,nhd->bsd", out_BxSxNxH, cast(self.w_o))
