"""Loss-logits study: the training loss's logits kept in float32 or rounded to bf16
(`model.loss_logits_dtype`), over three seeds, with a 32,768-token BPE so that the output
layer is a large share of the step.

  python -m moe_jax.sweep experiments/loss_logits.py:gpu
  python -m moe_jax.sweep experiments/loss_logits.py:gpu --members=float32 --print_commands

bf16 logits (the output matmul still accumulating in float32, the log-normalizer and softmax
computed in float32 from the rounded logits) are what Megatron, torchtitan and MaxText train
with; they take about 1% off the 1.29B benchmark model's step and 4 GiB off the `gpu` size's
peak memory (docs/performance.md). The question is whether they cost any loss. The runs of
2026-12-01 and what they show: experiments/results/loss_logits_gpu/NOTES.md.
"""

from experiments.sizes import size
from moe_jax.sweep import Sweep

BPE = {"data.tokenizer": "bpe", "model.vocab_size": 32768}
SIZE_OVERRIDES = {"tiny": {"model.vocab_size": 1024},   # the tiny corpus's BPE stays small
         "gpu": {"train.steps": 1000, "train.eval_every": 500}}
MEMBERS = {"float32": {"model.loss_logits_dtype": "float32"},
           "bfloat16": {"model.loss_logits_dtype": "bfloat16"}}
QUESTION = ("Does rounding the training loss's logits to bf16 change the validation loss beyond "
            "what another seed does? (Validation always uses float32 logits, so both members are "
            "measured alike.)")


def get_sweep(size_name: str) -> Sweep:
  config, base = size(size_name)
  return Sweep("loss_logits", config, {**base, **BPE, **SIZE_OVERRIDES[size_name]}, MEMBERS, QUESTION,
               seeds=(0, 1, 2))
