"""Compiled memory of each single-device dispatcher, forward + backward, for growing token counts.

The one-hot `dense` dispatcher materialises [T, E, C] dispatch and combine tensors, and C grows
with T, so its memory grows with T^2 * K; the sort-based `capacity` and `dropless` grow with T.
Prints a Markdown table of XLA's temporary-buffer size (compiled memory statistics, no run).

  python scripts/dispatch_memory.py [--experts 16] [--top_k 2] [--d_model 128] [--expert_dim 96]
"""

import argparse

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.dispatch import DISPATCHERS, SwiGLUExperts


def temp_bytes(name: str, tokens: int, experts: int, top_k: int, d_model: int, expert_dim: int,
               capacity_factor: float) -> int:
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            [(tokens, d_model), (tokens, experts), (experts, d_model, expert_dim),
             (experts, d_model, expert_dim), (experts, expert_dim, d_model)]]

  def loss(x, logits, *weights):
    decision = routing.topk_route(logits, None, top_k=top_k)
    out = DISPATCHERS[name](x, decision.expert_ids, decision.gates, SwiGLUExperts(*weights),
                            capacity_factor)
    return jnp.sum(out.output ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=16)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--expert_dim", type=int, default=96)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
  args = parser.parse_args()
  names = ["dense", "capacity", "dropless"]
  print(f"E={args.experts} K={args.top_k} D={args.d_model} F={args.expert_dim} "
        f"capacity_factor={args.capacity_factor}, backend={jax.default_backend()}, "
        f"jax {jax.__version__}\n")
  print("| tokens | " + " | ".join(f"{n} temp MiB" for n in names) + " |")
  print("|---|" + "---|" * len(names))
  for tokens in args.tokens:
    sizes = [temp_bytes(n, tokens, args.experts, args.top_k, args.d_model, args.expert_dim,
                        args.capacity_factor) / 2**20 for n in names]
    print(f"| {tokens} | " + " | ".join(f"{s:,.1f}" for s in sizes) + " |", flush=True)


if __name__ == "__main__":
  main()
