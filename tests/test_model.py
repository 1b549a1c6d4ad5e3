"""Model shapes, causality, dtypes and routing statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.layers.moe import BalancingBias
from moe_jax.model import ModelSpec, Transformer


def _model(config, **overrides):
  config.model.update(overrides)
  return Transformer(ModelSpec.from_config(config.model), nnx.Rngs(params=0))


def test_shapes_and_statistics(tiny_config):
  m = tiny_config.model
  model = _model(tiny_config)
  tokens = jax.random.randint(jax.random.key(0), (3, 20), 0, 256)
  logits, stats = model(tokens)
  assert logits.shape == (3, 20, m.vocab_size) and logits.dtype == jnp.float32
  num_moe = m.num_layers - m.num_dense_layers
  assert stats.counts.shape == (num_moe, m.num_routed_experts)
  np.testing.assert_allclose(stats.counts.sum(-1), 3 * 20 * m.top_k)
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
  logits, _ = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_grouped_query_attention_and_dense_only_model(tiny_config):
  model = _model(tiny_config, num_heads=4, num_kv_heads=2, num_dense_layers=2)
  logits, stats = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.shape[:2] == (1, 8) and stats is None
