"""Multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent.

  queries:  x -> [q_down -> RMSNorm -> q_up] (or one w_q when q_lora_rank = 0)
            -> per head [qk_nope | qk_rope] channels; RoPE on the rope part
  latent:   x -> kv_down -> [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim, one for all heads)]
            c_kv -> RMSNorm -> kv_up -> per head [k_nope (qk_nope) | v (v_head_dim)]
  keys = [k_nope | k_rope]; softmax scale (qk_nope + qk_rope)^-0.5 x YaRN's mscale^2.

A decoding cache needs only the normalised latent and k_rope per position (kv_lora_rank +
qk_rope_head_dim numbers instead of 2 x heads x head_dim); `keys_and_values` expands it.
RoPE pairs are interleaved, (2i, 2i + 1), as in DeepSeek's own code, so their released
weights load unchanged.

Shape letters: B batch, S sequence, D model width, N heads, R latent rank (q or kv),
P rope width, C no-rope width, V value width.
"""

import jax.numpy as jnp
from flax import nnx

from moe_jax.layers import rope as rope_lib
from moe_jax.layers.attention import (attend, cached_attention_weights, project_heads,
                                      write_cache)
from moe_jax.layers.mlp import scaled_normal
from moe_jax.layers.norms import rms_norm
from moe_jax.layers.params import KeySource, param


class LatentAttention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, q_lora_rank: int, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
               rope: rope_lib.Rope, norm_eps: float, dtype, rngs: KeySource,
               implementation: str = "auto"):
    qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
    init = scaled_normal(d_model)
    if q_lora_rank:
      self.w_q_down = param(init(rngs.params(), (d_model, q_lora_rank)), "embed", "latent")
      self.q_norm_scale = param(jnp.ones((q_lora_rank,), jnp.float32), "latent")
      self.w_q_up = param(scaled_normal(q_lora_rank)(
          rngs.params(), (q_lora_rank, num_heads, qk_head_dim)), "latent", "heads", "head_dim")
    else:
      self.w_q = param(init(rngs.params(), (d_model, num_heads, qk_head_dim)),
                       "embed", "heads", "head_dim")
    self.w_kv_down = param(init(rngs.params(), (d_model, kv_lora_rank + qk_rope_head_dim)),
                           "embed", "latent")
    self.kv_norm_scale = param(jnp.ones((kv_lora_rank,), jnp.float32), "latent")
    self.w_kv_up = param(scaled_normal(kv_lora_rank)(
        rngs.params(), (kv_lora_rank, num_heads, qk_nope_head_dim + v_head_dim)),
        "latent", "heads", "head_dim")
    self.w_o = param(scaled_normal(num_heads * v_head_dim)(
        rngs.params(), (num_heads, v_head_dim, d_model)), "heads", "head_dim", "embed")
    self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
    self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
    self.rope, self.norm_eps, self.dtype = rope, norm_eps, dtype
    self.implementation = implementation   # attention's, see attention.IMPLEMENTATIONS
    self.softmax_scale = qk_head_dim ** -0.5 * rope_lib.softmax_scale_factor(rope)

  def _cast(self, w):
    return w[...].astype(self.dtype)

  def _rotate(self, t, positions_S):
    inv_freq = rope_lib.inverse_frequencies(self.qk_rope_head_dim, self.rope)
    return rope_lib.rotate(t, positions_S, inv_freq, rope_lib.rotation_scale(self.rope),
                           interleaved=True)

  def queries(self, x_BxSxD, positions_S):
    """[B, S, N, C + P]: no-rope channels, then the rotated rope channels."""
    if self.q_lora_rank:
      latent = rms_norm(x_BxSxD @ self._cast(self.w_q_down), self.q_norm_scale[...], self.norm_eps)
      q = jnp.einsum("bsr,rnh->bsnh", latent, self._cast(self.w_q_up))
    else:
      q = jnp.einsum("bsd,dnh->bsnh", x_BxSxD, self._cast(self.w_q))
    q_nope, q_rope = jnp.split(q, [self.qk_nope_head_dim], axis=-1)
    return jnp.concatenate([q_nope, self._rotate(q_rope, positions_S)], axis=-1)

  def latent(self, x_BxSxD, positions_S):
    """What a cache keeps per position: the normalised latent [B, S, R] and the rotated
    shared rope key [B, S, P]."""
    c_kv, k_rope = jnp.split(x_BxSxD @ self._cast(self.w_kv_down), [self.kv_lora_rank], axis=-1)
    c_kv = rms_norm(c_kv, self.kv_norm_scale[...], self.norm_eps)
    return c_kv, self._rotate(k_rope[:, :, None, :], positions_S)[:, :, 0, :]

  def keys_and_values(self, c_kv_BxSxR, k_rope_BxSxP):
    """Per-head keys [B, S, N, C + P] and values [B, S, N, V] from the latent."""
    kv = jnp.einsum("bsr,rnh->bsnh", c_kv_BxSxR, self._cast(self.w_kv_up))
    k_nope, v = jnp.split(kv, [self.qk_nope_head_dim], axis=-1)
    k_rope = jnp.broadcast_to(k_rope_BxSxP[:, :, None, :], (*k_nope.shape[:3], k_rope_BxSxP.shape[-1]))
    return jnp.concatenate([k_nope, k_rope], axis=-1), v

  def __call__(self, x_BxSxD, positions_S):
    x = x_BxSxD.astype(self.dtype)
    q = self.queries(x, positions_S)
    k, v = self.keys_and_values(*self.latent(x, positions_S))
    out_BxSxNxV = attend(q, k, v, self.softmax_scale, self.implementation)
    return project_heads(out_BxSxNxV, self._cast(self.w_o))

  def init_cache(self, batch: int, max_len: int):
    """The normalised latent [B, max_len, R] and the rotated RoPE key [B, max_len, P]."""
    return (jnp.zeros((batch, max_len, self.kv_lora_rank), self.dtype),
            jnp.zeros((batch, max_len, self.qk_rope_head_dim), self.dtype))

  def decode(self, x_BxTxD, positions_T, cache, start):
    """Attention for T new tokens over the latent cache, in the absorbed form: the key
    up-projection folds into the query and the value up-projection into the output, so
    per-head keys and values are never built. Returns (output [B, T, D], new cache)."""
    x = x_BxTxD.astype(self.dtype)
    q_nope, q_rope = jnp.split(self.queries(x, positions_T), [self.qk_nope_head_dim], axis=-1)
    c_kv, k_rope = self.latent(x, positions_T)
    c_cache, rope_cache = write_cache(cache[0], c_kv, start), write_cache(cache[1], k_rope, start)
    w_uk, w_uv = jnp.split(self._cast(self.w_kv_up), [self.qk_nope_head_dim], axis=-1)
    q_latent = jnp.einsum("btnc,rnc->btnr", q_nope, w_uk)
    scores = (jnp.einsum("btnr,bsr->bnts", q_latent, c_cache)
              + jnp.einsum("btnp,bsp->bnts", q_rope, rope_cache)) * self.softmax_scale
    weights = cached_attention_weights(scores, positions_T).astype(c_cache.dtype)
    out_latent = jnp.einsum("bnts,bsr->btnr", weights, c_cache)
    out = jnp.einsum("btnr,rnv->btnv", out_latent, w_uv)
    return jnp.einsum("btnv,nvd->btd", out, self._cast(self.w_o)), (c_cache, rope_cache)
