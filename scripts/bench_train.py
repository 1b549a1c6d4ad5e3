"""Training throughput: tokens/s and model-FLOPs utilisation of a DeepSeek-style MoE LM of about
1B total parameters on one accelerator, for each dispatcher.

  python scripts/bench_train.py                          # capacity and dropless
  python scripts/bench_train.py --dispatchers=dropless --batch=16

One full training step (forward, backward, AdamW update, balancing-bias update) on random
tokens, jitted as in `moe_jax.train`; the median of --repeats steps after --warmup steps.
Model FLOPs per token: 6 x the parameters a token uses (routed experts count top_k / E; the
embedding lookup is not a matmul and is left out, the output projection is in) plus attention,
12 x layers x heads x head_dim x sequence (PaLM's count, no causal discount). MFU is those
FLOPs per second over the chip's dense bf16 peak (--peak_tflops, 989 for an H100 SXM), and
also over a bf16 matmul measured in the same run.
"""

import argparse
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax import steps   # noqa: E402
from moe_jax.model import ModelSpec, parameter_counts   # noqa: E402

# About 1.3B parameters, about 0.26B used per token: 16 blocks of width 1024 (the first dense),
# 64 routed experts of width 384 top-6 plus 2 shared, a 32K vocabulary.
SPEC = ModelSpec(
    vocab_size=32768, d_model=1024, num_layers=16, num_dense_layers=1, num_heads=16,
    num_kv_heads=4, head_dim=64, rope_theta=10_000.0, dense_mlp_dim=4096, norm_eps=1e-6,
    compute_dtype="bfloat16", num_routed_experts=64, num_shared_experts=2, expert_dim=384,
    top_k=6, router="sigmoid", route_scale=1.0, norm_topk_prob=True, num_groups=1,
    topk_groups=1, group_score="top2_sum", dispatcher="capacity", capacity_factor=1.25,
    expert_parallel="none", expert_parallel_chunks=1, switch_loss_alpha=0.0,
    sequence_loss_alpha=1e-4, z_loss_coef=0.0)


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
  counts = parameter_counts(spec)
  matmul_params = counts["active"] - spec.vocab_size * spec.d_model   # no embedding lookup
  attention = 12 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len
  return 6 * matmul_params + attention


def median_seconds(fn, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_ceiling() -> float:
  """TFLOP/s of a bf16 8192^3 matmul on this device."""
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  seconds = median_seconds(lambda: f(a).block_until_ready(), 20, 20)
  return 2 * 8192 ** 3 / seconds / 1e12


def bench(spec: ModelSpec, batch: int, seq_len: int, warmup: int, repeats: int) -> dict:
  tx = steps.make_optimizer(steps.make_schedule(1e-3, 10, 1000, 0.1), 0.9, 0.95, 0.1, 1.0)
  graphdef, state = steps.init_state(spec, tx, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   bias_update_rate=1e-3), donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, spec.vocab_size)
  holder = [state]

  def one_step():
    holder[0], metrics = step(holder[0], tokens)
    jax.block_until_ready(metrics["loss"])

  seconds = median_seconds(one_step, warmup, repeats)
  tokens_per_second = batch * seq_len / seconds
  return {"seconds": seconds, "tokens_per_second": tokens_per_second,
          "model_tflops": model_flops_per_token(spec, seq_len) * tokens_per_second / 1e12}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dispatchers", default="capacity,dropless")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  parser.add_argument("--dense_reference", action="store_true",
                      help="also time a dense model of the same FLOPs per token")
  args = parser.parse_args()
  counts = parameter_counts(SPEC)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {datetime.date.today()}: "
        f"{counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e9:.3f}B used per token "
        f"({counts['embedding'] / 1e6:.0f}M in embedding and output), batch {args.batch} x "
        f"{args.seq} tokens", flush=True)
  ceiling = matmul_ceiling()
  print(f"bf16 8192^3 matmul: {ceiling:.0f} TFLOP/s", flush=True)
  variants = [(d, SPEC._replace(dispatcher=d)) for d in args.dispatchers.split(",") if d]
  if args.dense_reference:   # every block dense, as wide as the experts a token uses
    width = (SPEC.top_k + SPEC.num_shared_experts) * SPEC.expert_dim
    variants.append((f"dense model, MLP width {width} (same FLOPs per token)",
                     SPEC._replace(num_dense_layers=SPEC.num_layers, dense_mlp_dim=width)))
  rows = []
  for dispatcher, spec in variants:
    result = bench(spec, args.batch, args.seq, args.warmup, args.repeats)
    rows.append((dispatcher, result))
    print(f"  {dispatcher}: {result['seconds'] * 1e3:.1f} ms/step, "
          f"{result['tokens_per_second']:,.0f} tokens/s, {result['model_tflops']:.0f} TFLOP/s", flush=True)
  print("\ncommand: python scripts/bench_train.py " + " ".join(sys.argv[1:]))
  print("| dispatcher | ms / step | tokens/s | model TFLOP/s | MFU (of peak) | of measured matmul |")
  print("|---|---|---|---|---|---|")
  for dispatcher, r in rows:
    print(f"| {dispatcher} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_second']:,.0f} | "
          f"{r['model_tflops']:.0f} | {100 * r['model_tflops'] / args.peak_tflops:.1f}% | "
          f"{100 * r['model_tflops'] / ceiling:.1f}% |")


if __name__ == "__main__":
  main()
