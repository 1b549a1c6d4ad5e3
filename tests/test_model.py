"""Model shapes, causality, dtypes and routing statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.layers import attention
from moe_jax.layers.logits import output_cross_entropy, output_logits
from moe_jax.layers.moe import BalancingBias
from moe_jax.layers.params import ParamKeys
from moe_jax.model import ModelSpec, Transformer
from moe_jax.settings import ConfigError


def _model(config, capacity_factor: float | None = None, **model_overrides):
  config.model.update(model_overrides)
  if capacity_factor is not None:
    config.dispatch.capacity_factor = capacity_factor
  return Transformer(ModelSpec.from_config(config), nnx.Rngs(params=0))


def test_param_keys_give_the_parameters_of_nnx_rngs(tiny_config):
  """The package builds models with ParamKeys (its count outside the arrays, for fast traces):
  every parameter and bias equal, bit for bit, to those nnx.Rngs(params=seed) gives, on a model
  with latent attention, shared experts, scanned layers and an MTP module."""
  tiny_config.model.update(attention="mla", kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, num_shared_experts=1, mtp_depth=1,
                           num_layers=3, scan_layers=True)
  spec = ModelSpec.from_config(tiny_config)
  models = [Transformer(spec, keys) for keys in (nnx.Rngs(params=7), ParamKeys(7))]
  built = [nnx.state(model, nnx.Param, BalancingBias) for model in models]
  paths = [[jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)]
           for b in built]
  assert paths[0] == paths[1] and len(paths[0]) > 30
  for path, a, b in zip(paths[0], *map(jax.tree.leaves, built)):
    np.testing.assert_array_equal(a, b, err_msg=path)
  other = Transformer(spec, ParamKeys(8)).embed[...]
  assert not np.array_equal(other, models[1].embed[...])   # the seed matters


def test_shapes_and_statistics(tiny_config):
  m = tiny_config.model
  model = _model(tiny_config)
  tokens = jax.random.randint(jax.random.key(0), (3, 20), 0, 256)
  logits, stats = model(tokens)
  assert logits.shape == (3, 20, m.vocab_size) and logits.dtype == jnp.float32
  num_moe = m.num_layers - m.num_dense_layers
  assert stats.counts.shape == (num_moe, m.num_routed_experts)
  np.testing.assert_allclose(stats.counts.sum(-1), 3 * 20 * tiny_config.router.top_k)
  assert len(model.moe_layers()) == num_moe


def test_causal(tiny_config):
  """Changing a later token leaves earlier logits untouched (capacity large enough to drop nothing)."""
  model = _model(tiny_config, capacity_factor=float(tiny_config.model.num_routed_experts))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
  a, _ = model(tokens)
  b, _ = model(changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-4


def test_bias_is_state_not_a_parameter(tiny_config):
  model = _model(tiny_config)
  params = nnx.state(model, nnx.Param)
  biases = nnx.state(model, BalancingBias)
  param_paths = {path for path, _ in nnx.to_flat_state(params)}
  bias_paths = {path for path, _ in nnx.to_flat_state(biases)}
  assert bias_paths and not (bias_paths & param_paths)
  assert all(path[-1] == "balancing_bias" for path in bias_paths)


def test_bfloat16_compute_keeps_float32_parameters(tiny_config):
  model = _model(tiny_config, compute_dtype="bfloat16")
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(1, 16) * 7 % 256
  logits, _ = model(tokens)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
  # The same parameters computing in float32: close, but not equal (bf16 rounding happened; a
  # token whose top-k choice flips may differ more).
  reference = _model(tiny_config, compute_dtype="float32")
  nnx.update(reference, nnx.state(model))
  difference = np.abs(np.asarray(logits - reference(tokens)[0]))
  assert difference.max() > 1e-4 and np.median(difference) < 0.05, (difference.max(), np.median(difference))


def test_grouped_query_attention_and_dense_only_model(tiny_config):
  model = _model(tiny_config, num_heads=4, num_kv_heads=2, num_dense_layers=2)
  logits, stats = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.shape[:2] == (1, 8) and stats is None


def test_output_logits_are_float32_and_backward_products_take_a_16_bit_cotangent():
  keys = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(keys[0], (2, 5, 8)), jax.random.normal(keys[1], (8, 11))
  cotangent = jax.random.normal(keys[2], (2, 5, 11))
  plain = lambda x, w: jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)
  # float32 inputs: exactly the plain product and its gradients.
  for fn_out, ref_out in zip(jax.vjp(output_logits, x, w)[1](cotangent),
                             jax.vjp(plain, x, w)[1](cotangent)):
    np.testing.assert_allclose(fn_out, ref_out, rtol=1e-5, atol=1e-6)
  # bf16 inputs: float32 logits; gradients as if the cotangent were rounded to bf16 first.
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  logits, vjp = jax.vjp(output_logits, x16, w16)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, plain(x16, w16), rtol=1e-6)
  dx, dw = vjp(cotangent)
  g16 = cotangent.astype(jnp.bfloat16).astype(jnp.float32)
  x32, w32 = x16.astype(jnp.float32), w16.astype(jnp.float32)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(jnp.float32), jnp.einsum("bsv,dv->bsd", g16, w32),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dw.astype(jnp.float32), jnp.einsum("bsd,bsv->dv", x32, g16),
                             rtol=1e-2, atol=1e-2)


def test_output_cross_entropy_equals_the_projection_then_optax_cross_entropy():
  keys = jax.random.split(jax.random.key(1), 4)
  x, w = jax.random.normal(keys[0], (2, 5, 8)), 0.5 * jax.random.normal(keys[1], (8, 11))
  targets = jax.random.randint(keys[2], (2, 5), 0, 11).at[0, :2].set(jnp.array([0, 10]))
  weights = jax.random.uniform(keys[3], (2, 5))   # a cotangent that differs per position
  apart = lambda x, w: jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(
      output_logits(x, w), targets))
  fused = lambda x, w: jnp.sum(weights * output_cross_entropy(x, w, targets)[0])
  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.0)):
    args = x.astype(dtype), w.astype(dtype)
    (want, want_grads), (got, got_grads) = (jax.value_and_grad(f, (0, 1))(*args)
                                            for f in (apart, fused))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    hits = output_cross_entropy(*args, targets)[1]   # the top logit is the target: 1.0
    top = jnp.argmax(output_logits(*args), axis=-1)
    assert 0 < hits.sum() < hits.size and (hits == (top == targets)).all()
    for g, ref in zip(got_grads, want_grads):   # bf16: both round the same cotangent once
      assert g.dtype == dtype
      np.testing.assert_allclose(g.astype(jnp.float32), ref.astype(jnp.float32),
                                 rtol=tolerance, atol=tolerance)


def test_bf16_loss_logits_give_the_loss_and_gradients_of_logits_rounded_to_bf16():
  """model.loss_logits_dtype='bfloat16': the loss of float32-accumulated logits rounded to
  bf16, softmax in float32 (optax's loss on those rounded logits), and its gradients; not the
  float32 logits' loss, which it stays within bf16's rounding of."""
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (2, 7, 16)).astype(jnp.bfloat16)
  w = (2.0 * jax.random.normal(keys[1], (16, 300))).astype(jnp.bfloat16)   # logits of ~10
  targets = jax.random.randint(keys[2], (2, 7), 0, 300)
  weights = jax.random.uniform(keys[3], (2, 7))
  rounded = lambda x, w: jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(
      output_logits(x, w).astype(jnp.bfloat16).astype(jnp.float32), targets))
  fused = lambda dtype: lambda x, w: jnp.sum(
      weights * output_cross_entropy(x, w, targets, dtype)[0])
  (want, want_grads), (got, got_grads), (full, _) = (
      jax.value_and_grad(f, (0, 1))(x, w)
      for f in (rounded, fused(jnp.bfloat16), fused(jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got != full and abs(got - full) < 1e-2 * abs(full)
  for g, ref in zip(got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), ref.astype(jnp.float32),
                               rtol=1e-2, atol=1e-2 * float(jnp.abs(ref).max()))


def test_attention_takes_the_xla_path_off_gpu_and_can_be_forced():
  on_gpu = jax.default_backend() == "gpu"
  assert attention.chosen_implementation(jnp.bfloat16, 64) == ("cudnn" if on_gpu else "xla")
  assert attention.chosen_implementation(jnp.float32, 64) == "xla"
  assert attention.chosen_implementation(jnp.float32, 64, "cudnn") == "cudnn"
  with pytest.raises(ConfigError, match="model.attention_implementation='flash' is unknown"):
    ModelSpec(attention_implementation="flash")


def test_cudnn_lengths_are_padded_to_whole_tiles_and_padding_changes_nothing():
  # cuDNN refuses odd lengths in training (an MTP module attends over seq_len - 1 positions).
  assert [attention.padded_length(n, "cudnn") for n in (1, 63, 64, 65, 1023, 1024)] == \
      [64, 64, 64, 128, 1024, 1024]
  assert attention.padded_length(1023, "xla") == 1023
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, n, 16)) for i, n in ((0, 4), (1, 2), (2, 2)))
  v = v[..., :12]   # narrower values, as in MLA

  def loss(q, k, v, length):
    out = attention.attend_padded(q, k, v, 0.25, "xla", length)
    return jnp.sum(out * jnp.cos(out)), out

  (_, plain), plain_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 37)
  (_, padded), padded_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 64)
  assert padded.shape == plain.shape == (2, 37, 4, 12)
  np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
  for a, b in zip(padded_grads, plain_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
