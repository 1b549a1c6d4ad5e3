"""RoPE layouts, YaRN against hand-worked values, and MLA against a slow reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import rope as rope_lib
from moe_jax.layers.mla import LatentAttention
from moe_jax.model import ModelSpec, Transformer


def test_yarn_frequencies_match_hand_worked_values():
  # dim 8, theta 1e4: plain inverse frequencies 1, 0.1, 0.01, 0.001. With original length 64,
  # the pair turning 32 times sits at 8 ln(64 / (32 * 2 pi)) / (2 ln 1e4) = -0.50 -> floor 0,
  # the pair turning once at 1.008 -> ceil 2, so the ramp over pairs 0..3 is 0, 0.5, 1, 1 and
  # each frequency becomes f (1 - ramp) + f / 4 ramp.
  rope = rope_lib.Rope(10_000.0, "yarn", factor=4.0, original_max_len=64)
  np.testing.assert_allclose(rope_lib.inverse_frequencies(8, rope),
                             [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-6)
  np.testing.assert_allclose(rope_lib.inverse_frequencies(8, rope_lib.Rope(10_000.0)),
                             [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
  # DeepSeek-V2-Lite: factor 40, mscale = mscale_all_dim = 0.707: 0.1 * 0.707 * ln 40 + 1.
  v2_lite = rope_lib.Rope(10_000.0, "yarn", 40.0, 4096, 32.0, 1.0, 0.707, 0.707)
  assert rope_lib.softmax_scale_factor(v2_lite) == pytest.approx(1.260804 ** 2, rel=1e-6)
  assert rope_lib.rotation_scale(v2_lite) == 1.0
  assert rope_lib.softmax_scale_factor(rope_lib.Rope(10_000.0)) == 1.0


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_is_complex_multiplication_of_the_layouts_pairs(interleaved):
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  positions = np.array([0, 5, 17])
  inv_freq = rope_lib.inverse_frequencies(8, rope_lib.Rope(100.0))
  got = np.asarray(rope_lib.rotate(jnp.asarray(x), jnp.asarray(positions), inv_freq,
                                   interleaved=interleaved))
  real, imag = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :4], x[..., 4:])
  z = (real + 1j * imag) * np.exp(1j * positions[None, :, None, None] * inv_freq)
  expected = (np.stack([z.real, z.imag], -1).reshape(x.shape) if interleaved
              else np.concatenate([z.real, z.imag], -1))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _mla(q_lora_rank, rope=rope_lib.Rope(10_000.0), seed=0):
  return LatentAttention(d_model=16, num_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=6,
                         qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5, rope=rope,
                         norm_eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(params=seed))


def _reference_mla(layer, x, positions):
  """DeepSeek's MLA written out per head and position in numpy, in the latent-absorbed form
  a decoder uses: score = (q_nope W_uk^T) . c_kv + q_rope . k_rope, out = (p . c_kv) W_uv.
  YaRN's rotation scale multiplies cos and sin (as in Hugging Face's DeepSeek models)."""
  x = np.asarray(x, np.float64)
  p = lambda name: np.asarray(getattr(layer, name)[...], np.float64)
  rms = lambda v, scale: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * scale
  inv_freq = rope_lib.inverse_frequencies(4, layer.rope)

  def rotate(v_SxP):   # interleaved pairs as complex numbers
    z = (v_SxP[:, 0::2] + 1j * v_SxP[:, 1::2]) * np.exp(1j * positions[:, None] * inv_freq)
    z = z * rope_lib.rotation_scale(layer.rope)
    return np.stack([z.real, z.imag], -1).reshape(v_SxP.shape)

  batch, seq, _ = x.shape
  if layer.q_lora_rank:
    q = np.einsum("bsr,rnh->bsnh", rms(x @ p("w_q_down"), p("q_norm_scale")), p("w_q_up"))
  else:
    q = np.einsum("bsd,dnh->bsnh", x, p("w_q"))
  latent = x @ p("w_kv_down")
  c_kv, k_rope = rms(latent[..., :6], p("kv_norm_scale")), latent[..., 6:]
  w_uk, w_uv = p("w_kv_up")[..., :4], p("w_kv_up")[..., 4:]
  out = np.zeros((batch, seq, 3, 5))
  for b in range(batch):
    k_rot = rotate(k_rope[b])
    for h in range(3):
      q_nope, q_rope = q[b, :, h, :4], rotate(q[b, :, h, 4:])
      for t in range(seq):
        scores = np.array([(w_uk[:, h] @ q_nope[t]) @ c_kv[b, s] + q_rope[t] @ k_rot[s]
                           for s in range(t + 1)]) * layer.softmax_scale
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, t, h] = (weights @ c_kv[b, :t + 1]) @ w_uv[:, h]
  return np.einsum("bsnv,nvd->bsd", out, p("w_o"))


@pytest.mark.parametrize("q_lora_rank", [0, 5])
@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_latent_attention_matches_the_absorbed_reference(q_lora_rank, scaling):
  rope = rope_lib.Rope(10_000.0, scaling, 4.0, 8, 32.0, 1.0, 0.7, 0.9)
  layer = _mla(q_lora_rank, rope)
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  positions = np.arange(7)
  got = layer(x, jnp.asarray(positions))
  np.testing.assert_allclose(got, _reference_mla(layer, x, positions), rtol=2e-4, atol=2e-5)
  if scaling == "yarn":   # the mscale terms: softmax scale x (0.1 * 0.9 * ln 4 + 1)^2
    assert layer.softmax_scale == pytest.approx(8 ** -0.5 * (0.09 * math.log(4) + 1) ** 2)


def _spec():
  """A small MLA + YaRN model with dropless routing (nothing drops: positions independent)."""
  from configs.default import get_config
  tiny = ModelSpec.from_config(get_config("tiny"))
  return tiny.replace(
      vocab_size=64, d_model=32, dense_mlp_dim=48, num_heads=4, attention="mla",
      q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
      rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8, num_routed_experts=4,
      expert_dim=16, dispatch=tiny.dispatch.replace(strategy="dropless"))


def test_an_mla_model_is_causal_and_every_attention_weight_gets_a_gradient():
  model = Transformer(_spec(), nnx.Rngs(params=0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  logits, _ = model(tokens)
  changed, _ = model(tokens.at[:, 8].set((tokens[:, 8] + 1) % 64))
  np.testing.assert_allclose(logits[:, :8], changed[:, :8], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:, 8:], changed[:, 8:])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens)[0] ** 2)
  grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
  attention_grads = {k: v for k, v in grads if "attention" in k}
  assert {k[-1] for k in attention_grads} >= {"w_q_down", "q_norm_scale", "w_q_up", "w_kv_down",
                                              "kv_norm_scale", "w_kv_up", "w_o"}
  for path, g in attention_grads.items():
    assert float(jnp.abs(g[...]).max()) > 0, path


def test_recomputed_attention_equals_the_xla_path_and_keeps_only_its_inputs():
  """"xla_recompute" gives the XLA path's outputs and gradients, and its forward keeps q, k
  and v for the backward pass, not the [B, N, S, S] scores."""
  from moe_jax.layers.attention import attend
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 4, 16)) for i in range(3))
  loss = lambda implementation: lambda q, k, v: jnp.sum(attend(q, k, v, None, implementation) ** 2)
  for a, b in zip(jax.grad(loss("xla_recompute"), (0, 1, 2))(q, k, v),
                  jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  kept = lambda implementation: sum(
      r.size for r in jax.tree.leaves(jax.vjp(loss(implementation), q, k, v)[1]))
  # q, k, v, and the output the squared loss keeps; the XLA path adds [2, 4, 64, 64] scores
  assert kept("xla_recompute") <= 4 * q.size + 8
  assert kept("xla") >= kept("xla_recompute") + 2 * 4 * 64 * 64
