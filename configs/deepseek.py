r"""DeepSeek-shaped presets: the published models' shapes on top of configs/default.py.

  --config=configs/deepseek.py:v3        # DeepSeek-V3: 671B parameters, 37B per token
  --config=configs/deepseek.py:v2_lite   # DeepSeek-V2-Lite: 15.7B, 2.4B per token
  --config=configs/deepseek.py:bench_1b  # the 1.29B benchmark model of scripts/bench_train.py

`PYTHONPATH=. python configs/deepseek.py` prints each size's total and per-token parameter
counts (from shapes alone, nothing allocated) next to the published ones (tests/test_presets.py):

  v3: 671.03B total, 36.63B per token (+ 11.61B in MTP modules); published 671.0B / 37.0B
  v2_lite: 15.71B total, 2.45B per token (+ 0.00B in MTP modules); published 15.7B / 2.4B
  bench_1b: 1.29B total, 0.23B per token (+ 0.00B in MTP modules)

The counts are of the main model: DeepSeek-V3's multi-token-prediction module is on in the
preset and counted apart, as DeepSeek counts it (its released 14B also hold a copy of the
embedding and output head, which this model shares). Per token: the weights a token is
multiplied by, output head included, input embedding lookup not; the published per-token
figures are rounded to two digits.

The V3 and V2-Lite presets scan their layers (`model.scan_layers`: one block compiled per
kind) and keep only each block's input for the backward pass (`model.remat='block'`, the
least memory; `costly` is 10% faster where memory allows); the 1.29B benchmark does
neither, its unrolled step being faster and compiling in well under a minute
(docs/performance.md).
`python -m moe_jax.plan --config=configs/deepseek.py:v3 --find --device=h200` says how many
devices a preset needs. These are shapes for planning and for pretraining on your own data: the data section keeps
the default's (the embedded corpus, read as bytes); a real run sets `data.source='tokens'`
and `data.path`. Optimizer and schedule are the default's; DeepSeek-V3's own were AdamW with
b2 0.95, weight decay 0.1, peak 2.2e-4 after 2K warmup steps, which a run sets by override.
"""

import ml_collections

from configs.default import apply_shorthands
from configs.default import get_config as default_config

# DeepSeek-V3 (arXiv:2412.19437; the released config.json)
V3 = {
    "model.vocab_size": 129_280, "model.d_model": 7168, "model.num_layers": 61,
    "model.num_dense_layers": 3, "model.attention": "mla", "model.num_heads": 128,
    "model.num_kv_heads": 128, "model.head_dim": 192, "model.q_lora_rank": 1536,
    "model.kv_lora_rank": 512, "model.qk_nope_head_dim": 128, "model.qk_rope_head_dim": 64,
    "model.v_head_dim": 128, "model.rope_scaling": "yarn", "model.rope_factor": 40.0,
    "model.rope_original_max_len": 4096, "model.dense_mlp_dim": 18_432,
    "model.num_routed_experts": 256, "model.num_shared_experts": 1, "model.expert_dim": 2048,
    "model.compute_dtype": "bfloat16", "model.mtp_depth": 1, "model.scan_layers": True,
    "model.remat": "block",
    "router.score_function": "sigmoid", "router.top_k": 8, "router.num_groups": 8,
    "router.topk_groups": 4, "router.group_score": "top2_sum", "router.route_scale": 2.5,
    "router.norm_topk_prob": True,
    "balancing.bias_update_rate": 1e-3, "balancing.sequence_loss_alpha": 1e-4,
    "dispatch.strategy": "dropless",
    "data.seq_len": 4096,
}
# DeepSeek-V2-Lite (arXiv:2405.04434; the released config.json): no query latent, softmax
# router without renormalisation, 2 shared experts.
V2_LITE = {
    "model.vocab_size": 102_400, "model.d_model": 2048, "model.num_layers": 27,
    "model.num_dense_layers": 1, "model.attention": "mla", "model.num_heads": 16,
    "model.num_kv_heads": 16, "model.head_dim": 192, "model.q_lora_rank": 0,
    "model.kv_lora_rank": 512, "model.qk_nope_head_dim": 128, "model.qk_rope_head_dim": 64,
    "model.v_head_dim": 128, "model.rope_scaling": "yarn", "model.rope_factor": 40.0,
    "model.rope_original_max_len": 4096, "model.yarn_mscale": 0.707,
    "model.yarn_mscale_all_dim": 0.707, "model.dense_mlp_dim": 10_944,
    "model.num_routed_experts": 64, "model.num_shared_experts": 2, "model.expert_dim": 1408,
    "model.compute_dtype": "bfloat16", "model.scan_layers": True, "model.remat": "block",
    "router.score_function": "softmax", "router.top_k": 6, "router.norm_topk_prob": False,
    "balancing.bias_update_rate": 0.0, "balancing.sequence_loss_alpha": 0.0,
    "balancing.switch_loss_alpha": 1e-3,
    "dispatch.strategy": "dropless",
    "data.seq_len": 4096,
}
# The 1.29B benchmark model (docs/performance.md): 16 blocks of width 1024, the first dense,
# 64 routed experts of width 384 top-6 plus 2 shared, a 32K vocabulary.
BENCH_1B = {
    "model.vocab_size": 32_768, "model.d_model": 1024, "model.num_layers": 16,
    "model.num_dense_layers": 1, "model.num_heads": 16, "model.num_kv_heads": 4,
    "model.head_dim": 64, "model.dense_mlp_dim": 4096, "model.compute_dtype": "bfloat16",
    "model.num_routed_experts": 64, "model.num_shared_experts": 2, "model.expert_dim": 384,
    "router.top_k": 6, "dispatch.strategy": "dropless",
    "data.seq_len": 2048,
}
SIZES = {"v3": V3, "v2_lite": V2_LITE, "bench_1b": BENCH_1B}
# Published parameter counts of the main model: (total, per token).
PUBLISHED = {"v3": (671e9, 37e9), "v2_lite": (15.7e9, 2.4e9)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a size of SIZES, then optionally ",steps=N,batch=B,seq=S" as in configs/default.py."""
  size, _, overrides = (arg or "").partition(",")
  if not size:
    raise ValueError(f"configs/deepseek.py needs a size: --config=configs/deepseek.py:SIZE, SIZE "
                     f"one of {list(SIZES)}")
  if size not in SIZES:
    raise ValueError(f"configs/deepseek.py: unknown size {size!r}; expected one of {list(SIZES)}")
  c = default_config("default")
  c.data.tokenizer = "bytes"   # a learned BPE of 100K+ ids needs more text than the default's
  for key, value in SIZES[size].items():
    section, field = key.split(".")
    c[section][field] = value
  apply_shorthands(c, overrides)
  return c


def parameter_counts(config, mtp: bool = False) -> dict[str, int]:
  """Parameter counts (moe_jax.model.parameter_counts) of the main model, or with `mtp` of the
  model with its MTP modules; "per_token" is "active" without the input embedding lookup
  (the weights a token is multiplied by, output head included: what the published per-token
  figures count)."""
  from moe_jax import model
  spec = model.ModelSpec.from_config(config)
  counts = model.parameter_counts(spec if mtp else spec.replace(mtp_depth=0))
  return {**counts, "per_token": counts["active"] - spec.vocab_size * spec.d_model}


if __name__ == "__main__":
  for name in SIZES:
    config = get_config(name)
    main, whole = parameter_counts(config), parameter_counts(config, mtp=True)
    published = PUBLISHED.get(name)
    said = (f"; published {published[0] / 1e9:.1f}B / {published[1] / 1e9:.1f}B"
            if published else "")
    print(f"{name}: {main['total'] / 1e9:.2f}B total, {main['per_token'] / 1e9:.2f}B per token "
          f"(+ {(whole['total'] - main['total']) / 1e9:.2f}B in MTP modules){said}")
