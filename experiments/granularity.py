"""Granularity study: 8 experts top-1, 16 top-2, 32 top-4, 64 top-8 at equal active expert
width, each without and with one shared expert.

Every member activates about the same expert hidden width per token, ACTIVE: k routed experts
of width ACTIVE / k, or, with a shared expert, k + 1 experts of width ACTIVE / (k + 1)
(rounded; the table reports the exact active parameter counts).

  python -m moe_jax.sweep experiments/granularity.py:tiny --seeds=0,1,2
"""

from experiments.sizes import size
from moe_jax.sweep import Sweep

ACTIVE = {"tiny": 144, "gpu": 1536}   # expert hidden width each token uses
SHAPES = [(8, 1), (16, 2), (32, 4), (64, 8)]   # (routed experts, top-k)


def members(active: int) -> dict[str, dict]:
  result = {}
  for experts, k in SHAPES:
    for shared in (0, 1):
      name = f"e{experts}_k{k}" + ("+shared" if shared else "")
      result[name] = {"model.num_routed_experts": experts, "router.top_k": k,
                      "model.num_shared_experts": shared,
                      "model.expert_dim": round(active / (k + shared))}
  return result


def get_sweep(size_name: str) -> Sweep:
  config, base = size(size_name)
  return Sweep("granularity", config, base, members(ACTIVE[size_name]),
               "At equal active parameters, how do finer experts and a shared expert change "
               "validation loss and balance? Aux-loss-free balancing (gamma 1e-2) plus the "
               "sequence-wise loss (1e-4) and dropless dispatch for every member.")
