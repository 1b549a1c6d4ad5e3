"""The model and run sizes the studies share: each sweep's members differ from these only in
the settings the study varies, so every member of a study costs the same compute. Both sizes
use dropless dispatch (no token is dropped, so better balance buys no extra compute) and
evaluate on the whole validation split (validation MaxVio is Wang et al.'s MaxVio_global)."""

CONFIG = "configs/default.py"

# tiny: about 2 minutes per member on a 2-core CPU. 3 blocks (1 dense, 2 MoE) of width 64, 16
# routed experts of width 32 plus one shared, top-2; 1,500 steps of 16 x 128 bytes (3M).
TINY = {
    "model.num_layers": 3,
    "model.num_routed_experts": 16,
    "model.expert_dim": 32,
    "dispatch.strategy": "dropless",
    "data.seq_len": 128,
    "data.batch_size": 16,
    "train.steps": 1500,
    "optimizer.warmup_steps": 100,
    "train.log_every": 10,
    "train.eval_every": 500,               # the whole split (532 batches here) three times
    "train.eval_batches": 0,
    "train.checkpoint_every": 500,
    "train.sample_tokens": 0,
}

# gpu: about 3 minutes per member on one H200. The `gpu` config size (configs/default.py:
# width 512, 8 blocks, 64 experts top-6, bfloat16, dropless, the `python` corpus as bytes) for
# 2,000 steps of 64 x 1,024 bytes (131M, under one epoch of that corpus).
GPU = {
    "train.steps": 2000,
    "train.eval_every": 250,
    "train.checkpoint_every": 2000,
    "train.sample_tokens": 0,
}

SIZES = {"tiny": (f"{CONFIG}:tiny", TINY), "gpu": (f"{CONFIG}:gpu", GPU)}


def size(name: str) -> tuple[str, dict]:
  """(the --config argument, the base overrides) of a size; KeyError names the known ones."""
  if name not in SIZES:
    raise KeyError(f"unknown size; choose from {sorted(SIZES)}")
  return SIZES[name]
