"""Hugging Face checkpoints: tiny random models built with `transformers` config classes
(nothing downloaded) are saved, imported, and must match `transformers` in float32: logits
within 1e-4 and every MoE layer's top-k expert choices; import -> export -> import is exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from flax import nnx

from moe_jax import analysis, hf
from moe_jax.generate import decoding_model
from moe_jax.layers.moe import BalancingBias
from moe_jax.model import Transformer
from moe_jax.routing.choice import group_limited_mask

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.25)   # large weights: sharp attention and routing
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                     rope_theta=1e4)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                         first_k_dense_replace=1, moe_intermediate_size=16, q_lora_rank=24,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                         v_head_dim=6, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 8, "beta_fast": 32,
                                       "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0},
                         max_position_embeddings=32)),
    "deepseek_v2_lite": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                         dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                              first_k_dense_replace=1, moe_intermediate_size=16, q_lora_rank=None,
                              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=8, topk_method="greedy", routed_scaling_factor=1.0,
                              norm_topk_prob=False)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=32,
                       mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=16, norm_topk_prob=True, head_dim=12)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                   eos_token_id=1, pad_token_id=0, bos_token_id=None)),
}


def _hf_model(family, directory):
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(0)
  model = model_cls(config_cls(**COMMON, **extra)).eval()
  with torch.no_grad():   # make the correction bias and norms non-trivial
    for name, p in model.named_parameters():
      if "norm" in name or "e_score_correction_bias" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
    for name, buffer in model.named_buffers():
      if "e_score_correction_bias" in name:
        buffer.add_(0.05 * torch.randn_like(buffer))
  model.save_pretrained(directory)
  return model


def _hf_choices(model, tokens):
  """logits and each router's top-k expert ids (sorted) from transformers."""
  choices = []
  hooks = [m.register_forward_hook(lambda mod, args, out: choices.append(out[-1]))
           for name, m in model.named_modules() if type(m).__name__.endswith("Router")]
  with torch.no_grad():
    logits = model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
  for h in hooks:
    h.remove()
  return logits, [np.sort(c.numpy().reshape(tokens.shape + (-1,)), -1) for c in choices]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers_and_round_trips(family, tmp_path):
  theirs = _hf_model(family, tmp_path / "hf")
  imported = hf.load(tmp_path / "hf")
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, COMMON["vocab_size"])
  expected_logits, expected_choices = _hf_choices(theirs, tokens)
  model = decoding_model(imported.graphdef, imported.params, imported.biases)
  logits, _ = model(tokens)
  assert np.max(np.abs(np.asarray(logits) - expected_logits)) <= 1e-4
  run = analysis.run_from_hf(imported)
  ours = [np.sort(d.expert_ids, -1) for d in analysis.routing_trace(run, tokens)]
  assert len(ours) == len(expected_choices) > 0
  for layer, (a, b) in enumerate(zip(ours, expected_choices)):
    np.testing.assert_array_equal(a, b, err_msg=f"MoE layer {layer}")
  # Round trip: export, import again, export again: identical tensors.
  hf.save(tmp_path / "out", imported)
  again = hf.load(tmp_path / "out")
  first, second = hf.to_tensors(imported), hf.to_tensors(again)
  assert first.keys() == second.keys()
  for name in first:
    np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]), err_msg=name)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == \
      theirs.config.model_type


def test_masked_groups_are_minus_infinity_as_in_deepseeks_code_not_zero():
  """DeepSeek's inference code masks experts outside the chosen groups with -inf; Hugging
  Face fills 0. They differ when every kept expert's biased score is negative: a 0-filled
  masked expert then wins. Ours follows DeepSeek."""
  biased = jnp.array([[-0.2, -0.3, -0.9, -0.8]])          # groups {0, 1} and {2, 3}
  masked = group_limited_mask(biased, biased, num_groups=2, topk_groups=1, group_score="top2_sum")
  assert np.isneginf(np.asarray(masked[0, 2:])).all()
  ours = np.asarray(jax.lax.top_k(masked, 2)[1][0])
  zero_filled = np.where(np.isneginf(np.asarray(masked)), 0.0, np.asarray(masked))
  theirs = np.argsort(-zero_filled[0], kind="stable")[:2]
  assert sorted(ours) == [0, 1] and set(theirs) == {2, 3}


def test_bfloat16_import_halves_the_parameters_and_stays_close(tmp_path):
  theirs = _hf_model("deepseek_v3", tmp_path)
  full, half = hf.load(tmp_path), hf.load(tmp_path, jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(half.params))
  tokens = jax.random.randint(jax.random.key(1), (1, 9), 0, COMMON["vocab_size"])
  logits = lambda i: decoding_model(i.graphdef, i.params, i.biases)(tokens)[0]
  expected, _ = _hf_choices(theirs, tokens)
  np.testing.assert_allclose(logits(full), expected, atol=1e-4)
  # bf16 weights (f32 compute) move logits a little, and flip a few routing choices of this
  # sharply routed random model, which moves those positions more: compare on average.
  assert np.mean(np.abs(np.asarray(logits(half)) - expected)) < 0.1 * np.mean(np.abs(expected))


def test_deepseek_mtp_layers_import_export_and_transformers_ignores_them(tmp_path):
  """DeepSeek-V3's MTP layer (`model.layers.{num_hidden_layers}`: enorm, hnorm, eh_proj, a
  decoder layer, shared_head.norm, copies of the embedding and head) comes in as an MTP
  module and goes out again; transformers still loads the main model from our export."""
  theirs = _hf_model("deepseek_v3", tmp_path / "hf")
  imported = hf.load(tmp_path / "hf")
  assert imported.spec.mtp_depth == 0                  # transformers saved no MTP layer
  with_mtp_spec = imported.spec.replace(mtp_depth=1)
  model = nnx.merge(*nnx.split(Transformer(with_mtp_spec, nnx.Rngs(params=1))))
  graphdef, params, biases = nnx.split(model, nnx.Param, BalancingBias)
  for ours, source in ((params, imported.params), (biases, imported.biases)):
    flat = dict(nnx.to_flat_state(ours))
    for path, value in nnx.to_flat_state(source):   # the imported main model, MTP random
      flat[path][...] = value[...]
  with_mtp = hf.Imported(with_mtp_spec, graphdef, params, biases, imported.hf_config)
  hf.save(tmp_path / "out", with_mtp)
  layer = f"model.layers.{COMMON['num_hidden_layers']}"
  names = set(hf.to_tensors(with_mtp))
  assert {f"{layer}.eh_proj.weight", f"{layer}.enorm.weight", f"{layer}.shared_head.head.weight",
          f"{layer}.mlp.gate.e_score_correction_bias"} <= names
  again = hf.load(tmp_path / "out")
  assert again.spec.mtp_depth == 1
  for (path, a), (_, b) in zip(nnx.to_flat_state(with_mtp.params), nnx.to_flat_state(again.params)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
  reloaded = type(theirs).from_pretrained(tmp_path / "out").eval()
  tokens = jax.random.randint(jax.random.key(2), (1, 7), 0, COMMON["vocab_size"])
  np.testing.assert_allclose(_hf_choices(reloaded, tokens)[0], _hf_choices(theirs, tokens)[0],
                             atol=1e-6)


def test_an_import_with_scanned_layers_runs_traces_and_exports_the_same_tensors(tmp_path):
  _hf_model("deepseek_v3", tmp_path)
  listed, scanned = hf.load(tmp_path), hf.load(tmp_path, scan_layers=True)
  assert scanned.spec.scan_layers and "moe_blocks" in scanned.params
  tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, COMMON["vocab_size"])
  logits = lambda i: np.asarray(nnx.merge(i.graphdef, i.params, i.biases)(tokens)[0])
  np.testing.assert_allclose(logits(scanned), logits(listed), atol=1e-5)
  traces = [analysis.routing_trace(analysis.run_from_hf(i), tokens) for i in (listed, scanned)]
  for a, b in zip(*traces):
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
  want, got = hf.to_tensors(listed), hf.to_tensors(scanned)
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
