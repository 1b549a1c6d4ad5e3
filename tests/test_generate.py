"""Decoding with caches against the full forward pass, sampling rules, speculative decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import generate
from moe_jax.model import ModelSpec, Transformer


def _model(tiny_config, attention, mtp_depth=0, seed=0):
  m = tiny_config.model
  m.update(attention=attention, mtp_depth=mtp_depth, kv_lora_rank=24, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=20 if attention == "mla" else 0)
  model = Transformer(ModelSpec.from_config(tiny_config), nnx.Rngs(params=seed))
  return generate.decoding_model(*nnx.split(model, nnx.Param, ...))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_cached_decoding_matches_the_full_forward_pass(tiny_config, attention):
  model = _model(tiny_config, attention)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  full, _ = model(tokens)
  caches = model.init_cache(2, 16)[0]
  graphdef, state = nnx.split(model)
  decode = jax.jit(lambda state, tokens, caches, start: nnx.merge(graphdef, state).decode(
      tokens, caches, start))
  prefix, _, caches = decode(state, tokens[:, :5], caches, 0)            # a prompt at once
  np.testing.assert_allclose(prefix, full[:, :5], rtol=1e-4, atol=1e-4)
  for t in range(5, 12):                                                 # then one at a time
    logits, _, caches = decode(state, tokens[:, t:t + 1], caches, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
  if attention == "mla":   # the cache holds the latent and the RoPE key, not per-head K/V
    latent, rope_key = caches[0]
    assert latent.shape == (2, 16, 24) and rope_key.shape == (2, 16, 8)


def test_choose_greedy_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(generate.choose(logits, key, 0.0, 1.0)[0]) == 0
  keys = jax.random.split(key, 2000)
  draw = lambda top_p: np.array([int(generate.choose(logits, k, 1.0, top_p)[0]) for k in keys[:400]])
  assert set(draw(0.1)) == {0}                 # 0.5 alone reaches 0.1
  assert set(draw(0.7)) == {0, 1}              # 0.5 + 0.3 reaches 0.7: tokens 2, 3 cut
  batched = jax.vmap(lambda k: generate.choose(logits, k, 1.0, 1.0)[0])(keys)
  np.testing.assert_allclose(np.bincount(np.asarray(batched), minlength=4) / 2000,
                             [0.5, 0.3, 0.15, 0.05], atol=0.04)


@pytest.mark.parametrize("attention, depth", [("gqa", 1), ("mla", 2)])
def test_speculative_decoding_reproduces_greedy_decoding(tiny_config, attention, depth):
  model = _model(tiny_config, attention, mtp_depth=depth)
  prompt = jax.random.randint(jax.random.key(3), (1, 7), 0, 256)
  plain = generate.generate(model, prompt, 24)
  speculative = generate.speculative_generate(model, prompt, 24)
  np.testing.assert_array_equal(speculative.tokens, plain.tokens)
  assert 0 <= speculative.accepted_fraction <= 1
  assert speculative.forward_passes <= 23


def test_speculative_decoding_accepts_drafts_of_an_mtp_module_that_copies_the_main_head(
    tiny_config):
  """With depth-1 MTP weights built so that the module predicts what the main model will
  (a one-block model whose MTP block equals its only block, and a join that passes the
  embedding through), drafts are accepted far more often than chance."""
  tiny_config.model.update(num_layers=1, num_dense_layers=1)
  model = _model(tiny_config, "gqa", mtp_depth=1)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  d = tiny_config.model.d_model
  for path, value in list(flat.items()):
    if path[:2] == ("mtp", 0) and path[2] == "block":
      value[...] = flat[("blocks", 0) + path[3:]][...]
    if path[:3] == ("mtp", 0, "final_norm"):
      value[...] = flat[("final_norm",) + path[3:]][...]
  embedding_rms = jnp.sqrt(jnp.mean(flat[("embed",)][...] ** 2))     # undo the embed norm
  flat[("mtp", 0, "w_proj")][...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]) * embedding_rms
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  prompt = jax.random.randint(jax.random.key(4), (1, 5), 0, 256)
  speculative = generate.speculative_generate(model, prompt, 30)
  np.testing.assert_array_equal(speculative.tokens, generate.generate(model, prompt, 30).tokens)
  assert speculative.accepted_fraction > 0.5


def test_speculative_decoding_needs_mtp_modules(tiny_config):
  with pytest.raises(ValueError, match="model.mtp_depth = 0"):
    generate.speculative_generate(_model(tiny_config, "gqa"), jnp.zeros((1, 3), jnp.int32), 4)
