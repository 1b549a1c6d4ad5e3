"""The model and run sizes the studies share: each sweep's members differ from these only in
the settings the study varies, so every member of a study costs the same compute."""

CONFIG = "configs/default.py"

# tiny: about 2 minutes per member on a 2-core CPU. 3 blocks (1 dense, 2 MoE) of width 64,
# 16 routed experts of width 32 plus one shared, top-2; 1,500 steps of 16 x 128 tokens (3M).
TINY = {
    "model.num_layers": 3,
    "model.num_routed_experts": 16,
    "model.expert_dim": 32,
    "data.seq_len": 128,
    "data.batch_size": 16,
    "train.steps": 1500,
    "optimizer.warmup_steps": 100,
    "train.log_every": 10,
    "train.eval_every": 250,
    "train.eval_batches": 16,
    "train.checkpoint_every": 500,
    "train.sample_tokens": 0,
}

# gpu: one GPU, about an hour per member. 8 blocks (1 dense, 7 MoE) of width 512, 64 routed
# experts of width 256 plus one shared, top-6; 5,000 steps of 64 x 1,024 tokens in bfloat16.
GPU = {
    "model.d_model": 512,
    "model.num_layers": 8,
    "model.num_heads": 8,
    "model.num_kv_heads": 4,
    "model.head_dim": 64,
    "model.dense_mlp_dim": 1536,
    "model.num_routed_experts": 64,
    "model.expert_dim": 256,
    "router.top_k": 6,
    "model.compute_dtype": "bfloat16",
    "model.mtp_depth": 1,
    "optimizer.learning_rate": 3e-3,
    "optimizer.b2": 0.95,                  # the studies' recipe, not the CPU default's
    "optimizer.final_lr_fraction": 0.1,
    "data.tokenizer": "bytes",             # the studies' corpus, not the CPU default's BPE
    "model.vocab_size": 260,
    "data.seq_len": 1024,
    "data.batch_size": 64,
    "train.steps": 5000,
    "optimizer.warmup_steps": 200,
    "train.log_every": 50,
    "train.eval_every": 500,
    "train.eval_batches": 16,
    "train.checkpoint_every": 1000,
}

SIZES = {"tiny": (f"{CONFIG}:tiny", TINY), "gpu": (f"{CONFIG}:default", GPU)}


def size(name: str) -> tuple[str, dict]:
  """(the --config argument, the base overrides) of a size; KeyError names the known ones."""
  if name not in SIZES:
    raise KeyError(f"unknown size; choose from {sorted(SIZES)}")
  return SIZES[name]
