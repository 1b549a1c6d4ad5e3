"""Causal self-attention with rotary position embeddings and grouped-query heads.

Shape letters: B batch, S sequence, D model width, N query heads, G key/value heads, H head dim.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers import rope as rope_lib
from moe_jax.layers.mlp import scaled_normal
from moe_jax.layers.norms import rms_norm
from moe_jax.layers.params import KeySource, param

# model.attention_implementation: "cudnn" (fused flash attention, NVIDIA GPUs, bf16/fp16),
# "xla" (scores materialised; any backend), "xla_recompute" (the XLA path keeping only q, k, v
# for the backward pass, which recomputes the scores: a fused kernel's memory, any backend)
# or "auto" (cudnn where it applies, xla elsewhere).
IMPLEMENTATIONS = ("auto", "cudnn", "xla", "xla_recompute")


def chosen_implementation(dtype, head_dim: int, requested: str = "auto",
                          backend: str | None = None) -> str:
  """The path `jax.nn.dot_product_attention` takes for `requested`: with "auto", cuDNN's fused
  kernel on an NVIDIA GPU for 16-bit inputs and head dims it supports (jax's own default is
  the XLA path, which writes the [B, N, S, S] scores to memory several times in each pass).
  `backend`: the one to choose for (default: this process's, "gpu" meaning NVIDIA's)."""
  if requested != "auto":
    return requested
  on_nvidia = backend == "gpu" or backend is None and jax.default_backend() == "gpu" and (
      "rocm" not in jax.devices()[0].client.platform_version)
  fused = (on_nvidia and jnp.dtype(dtype).itemsize == 2
           and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused else "xla"


# cuDNN's fused kernels refuse some sequence lengths in training (odd ones: an MTP module
# attends over seq_len - 1 positions); they compute whole 64-row tiles anyway, so a length
# padded up to a multiple of this costs no extra tile.
CUDNN_LENGTH_MULTIPLE = 64


def padded_length(length: int, implementation: str) -> int:
  """The sequence length `implementation` is called with for `length` positions."""
  if implementation != "cudnn":
    return length
  return -(-length // CUDNN_LENGTH_MULTIPLE) * CUDNN_LENGTH_MULTIPLE


def attend(q_BxSxNxH, k_BxSxGxH, v_BxSxGxV, scale: float | None = None, requested: str = "auto"):
  """Causal softmax attention (grouped-query when G < N) through the implementation chosen for
  `requested`, at a sequence length it takes (see `attend_padded`)."""
  implementation = chosen_implementation(q_BxSxNxH.dtype, q_BxSxNxH.shape[-1], requested)
  return attend_padded(q_BxSxNxH, k_BxSxGxH, v_BxSxGxV, scale, implementation,
                       padded_length(q_BxSxNxH.shape[1], implementation))


def attend_padded(q_BxSxNxH, k_BxSxGxH, v_BxSxGxV, scale, implementation: str, length: int):
  """Causal attention computed at `length` >= S positions: the sequence is zero-padded at its
  end (under the causal mask no real position sees a padded one) and the padded rows are cut
  from the output. Values narrower than the query/key heads (MLA) are zero-padded too, as the
  fused kernels take one head width."""
  (_, real_length, _, width), v_width = q_BxSxNxH.shape, v_BxSxGxV.shape[-1]
  pad = lambda t, channels: jnp.pad(t, [(0, 0), (0, length - real_length), (0, 0), (0, channels)])
  attention = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True,
      implementation="xla" if implementation == "xla_recompute" else implementation)
  if implementation == "xla_recompute":
    attention = _recomputed(attention)
  out = attention(pad(q_BxSxNxH, 0), pad(k_BxSxGxH, 0), pad(v_BxSxGxV, width - v_width))
  return out[:, :real_length, :, :v_width]


def _recomputed(attention):
  """`attention(q, k, v)` whose backward pass recomputes it from q, k and v alone. A function
  with its own gradient rather than a `jax.checkpoint`: a block's remat policy then sees one
  call whose output it may keep, never the score matrices inside it (a policy that keeps
  matmul results would keep those of a nested checkpoint)."""

  @jax.custom_vjp
  def run(q, k, v):
    return attention(q, k, v)

  def forward(q, k, v):
    return attention(q, k, v), (q, k, v)

  def backward(residuals, d_out):
    return jax.vjp(attention, *residuals)[1](d_out)

  run.defvjp(forward, backward)
  return run


def cached_attention_weights(scores_BxNxTxS, positions_T):
  """Softmax over cache slots, each query seeing the slots at or before its own position
  (slots past the filled part hold stale or zero entries and stay masked)."""
  visible_TxS = jnp.arange(scores_BxNxTxS.shape[-1])[None, :] <= positions_T[:, None]
  scores = jnp.where(visible_TxS, scores_BxNxTxS.astype(jnp.float32), -jnp.inf)
  return jax.nn.softmax(scores, axis=-1)


def write_cache(cache_BxSmaxx, new_BxTx, start):
  """The cache with `new` written at positions start .. start + T - 1."""
  return jax.lax.dynamic_update_slice_in_dim(cache_BxSmaxx, new_BxTx.astype(cache_BxSmaxx.dtype),
                                             start, axis=1)


QK_NORMS = ("none", "per_head", "whole")


def project_heads(out_BxSxNxH, w_NxHxD):
  """The output projection, sum over heads n and width h of out[b, s, n, h] w[n, h, d], as one
  product with w as an [N x H, D] matrix. Contracted over n and h as two axes, the weight
  gradient's split-K partial sums came out transposed on GPU, and their sum, fused with the
  gradient norm, took 80 us per layer (1.3 ms of the 1.29B benchmark's step:
  docs/performance.md)."""
  batch, length, heads, width = out_BxSxNxH.shape
  return jnp.einsum("bsk,kd->bsd", out_BxSxNxH.reshape(batch, length, heads * width),
                    w_NxHxD.reshape(heads * width, -1))


class Attention(nnx.Module):
  """Grouped-query attention: N query heads share G key/value heads; half-split RoPE.

  Options of released models: `qkv_bias` (biases on the q, k, v projections: Qwen2-MoE) and
  `qk_norm`, an RMSNorm of queries and keys before RoPE, over each head ("per_head": Qwen3)
  or over all heads together ("whole": OLMoE).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               rope: rope_lib.Rope, dtype, rngs: KeySource, qkv_bias: bool = False,
               qk_norm: str = "none", norm_eps: float = 1e-6, implementation: str = "auto"):
    init = scaled_normal(d_model)
    self.w_q = param(init(rngs.params(), (d_model, num_heads, head_dim)),
                     "embed", "heads", "head_dim")
    self.w_k = param(init(rngs.params(), (d_model, num_kv_heads, head_dim)),
                     "embed", "kv_heads", "head_dim")
    self.w_v = param(init(rngs.params(), (d_model, num_kv_heads, head_dim)),
                     "embed", "kv_heads", "head_dim")
    self.w_o = param(scaled_normal(num_heads * head_dim)(
        rngs.params(), (num_heads, head_dim, d_model)), "heads", "head_dim", "embed")
    if qkv_bias:
      self.b_q = param(jnp.zeros((num_heads, head_dim), jnp.float32), "heads", "head_dim")
      self.b_k = param(jnp.zeros((num_kv_heads, head_dim), jnp.float32), "kv_heads", "head_dim")
      self.b_v = param(jnp.zeros((num_kv_heads, head_dim), jnp.float32), "kv_heads", "head_dim")
    if qk_norm == "per_head":
      self.query_norm_scale = param(jnp.ones((head_dim,), jnp.float32), "head_dim")
      self.key_norm_scale = param(jnp.ones((head_dim,), jnp.float32), "head_dim")
    elif qk_norm != "none":   # over all heads: [N * H] and [G * H], head by head
      self.query_norm_scale = param(jnp.ones((num_heads * head_dim,), jnp.float32), "heads")
      self.key_norm_scale = param(jnp.ones((num_kv_heads * head_dim,), jnp.float32), "kv_heads")
    self.rope, self.dtype = rope, dtype
    self.qkv_bias, self.qk_norm, self.norm_eps = qkv_bias, qk_norm, norm_eps
    self.implementation = implementation

  def __call__(self, x_BxSxD, positions_S):
    q, k, v = self._project(x_BxSxD.astype(self.dtype), positions_S)
    return self._output(attend(q, k, v, requested=self.implementation))

  def _cast(self, w):
    return w[...].astype(self.dtype)

  def _output(self, out_BxSxNxH):
    return project_heads(out_BxSxNxH, self._cast(self.w_o))

  def _project(self, x, positions_S):
    cast = self._cast
    inv_freq = rope_lib.inverse_frequencies(self.w_q.shape[-1], self.rope)
    rotate = lambda t: rope_lib.rotate(t, positions_S, inv_freq, rope_lib.rotation_scale(self.rope))
    q = jnp.einsum("bsd,dnh->bsnh", x, cast(self.w_q))
    k = jnp.einsum("bsd,dgh->bsgh", x, cast(self.w_k))
    v = jnp.einsum("bsd,dgh->bsgh", x, cast(self.w_v))
    if self.qkv_bias:
      q, k, v = q + cast(self.b_q), k + cast(self.b_k), v + cast(self.b_v)
    if self.qk_norm != "none":
      q, k = self._normalize(q, self.query_norm_scale), self._normalize(k, self.key_norm_scale)
    return rotate(q), rotate(k), v

  def _normalize(self, t_BxSxNxH, scale):
    if self.qk_norm == "per_head":
      return rms_norm(t_BxSxNxH, scale[...], self.norm_eps)
    flat = t_BxSxNxH.reshape(*t_BxSxNxH.shape[:2], -1)
    return rms_norm(flat, scale[...], self.norm_eps).reshape(t_BxSxNxH.shape)

  def init_cache(self, batch: int, max_len: int):
    """Keys and values [B, max_len, G, H] for decoding."""
    _, groups, width = self.w_k.shape
    zeros = jnp.zeros((batch, max_len, groups, width), self.dtype)
    return zeros, zeros

  def decode(self, x_BxTxD, positions_T, cache, start):
    """Attention for T new tokens at positions start .. start + T - 1 over the cache, which
    gets their keys and values; returns (output [B, T, D], new cache)."""
    q, k, v = self._project(x_BxTxD.astype(self.dtype), positions_T)
    keys, values = write_cache(cache[0], k, start), write_cache(cache[1], v, start)
    batch, length, heads, width = q.shape
    groups = keys.shape[2]
    q = q.reshape(batch, length, groups, heads // groups, width)
    scores = jnp.einsum("btgrh,bsgh->bgrts", q, keys) * width ** -0.5
    weights = cached_attention_weights(scores.reshape(batch, heads, length, -1), positions_T)
    weights = weights.reshape(batch, groups, heads // groups, length, -1).astype(values.dtype)
    out = jnp.einsum("bgrts,bsgh->btgrh", weights, values).reshape(batch, length, heads, width)
    return self._output(out), (keys, values)
