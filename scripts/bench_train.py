"""Training throughput: tokens/s and model-FLOPs utilisation of a DeepSeek-style MoE LM of about
1B total parameters on one accelerator, for each dispatcher.

  python scripts/bench_train.py                          # capacity and dropless
  python scripts/bench_train.py --dispatchers=dropless --batch=16
  python scripts/bench_train.py --dispatchers=dropless --remat=none,block   # memory vs time
  python scripts/bench_train.py --dispatchers=dropless --scan=off,on        # compile time
  python scripts/bench_train.py --dispatchers=dropless --moment_dtype=float32,bfloat16
  python scripts/bench_train.py --dispatchers=dropless --loss_logits_dtype=float32,bfloat16
  python scripts/bench_train.py --preset=v2_lite --layers=10 --batch=8 --seq=4096 \
      --microbatches=4 --remat=block --dispatchers=dropless                # a larger model

One full training step (forward, backward, AdamW update, balancing-bias update) on random
tokens, jitted as in `moe_jax.train`, after --warmup steps. The step time is that of --repeats
steps dispatched in a row and waited for at the end, as `moe_jax.train` runs them (median of
three such runs); beside it, the median of --repeats steps each waited for before the next is
dispatched, which adds the host's dispatch and the wait to every step. With --profile, the
device's idle time between kernels, and its time by kernel and by model part.
Model FLOPs per token: 6 x the parameters a token uses (routed experts count top_k / E; the
embedding lookup is not a matmul and is left out, the output projection is in) plus attention,
12 x layers x heads x head_dim x sequence (PaLM's count, no causal discount). MFU is those
FLOPs per second over the chip's dense bf16 peak (--peak_tflops, 989 for an H100 SXM), and
also over a bf16 matmul measured in the same run. Each variant also reports its compile time
and the memory XLA plans for the step (arguments + outputs + temporaries - donated).
"""

import argparse
import collections
import datetime
import functools
import gzip
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments   # noqa: E402
from configs.deepseek import get_config   # noqa: E402
from moe_jax import routing, steps   # noqa: E402
from moe_jax.dispatch.settings import GROUPED_MATMULS   # noqa: E402
from moe_jax.dispatch.strategies import DISPATCHERS   # noqa: E402
from moe_jax.layers import attention   # noqa: E402
from moe_jax.model import DTYPES, REMAT_POLICIES, ModelSpec, parameter_counts   # noqa: E402

# By default about 1.3B parameters, about 0.26B used per token: 16 blocks of width 1024 (the
# first dense), 64 routed experts of width 384 top-6 plus 2 shared, a 32K vocabulary
# (configs/deepseek.py: bench_1b).


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


def seconds_in_a_row(dispatch, wait, steps: int, rounds: int = 3) -> float:
  """Seconds per step as `moe_jax.train` runs them: `steps` steps dispatched one after another
  (the loop reads a step's loss while the next one runs, so the device never waits for the
  host between steps), waited for at the end; the median of `rounds` such runs. Each run
  counts from before its first dispatch, so it includes one step's dispatch latency."""
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(steps):
      dispatch()
    wait()
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times)


def matmul_ceiling() -> float:
  """TFLOP/s of a bf16 8192^3 matmul on this device."""
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  seconds = median_seconds(lambda: f(a).block_until_ready(), 20, 20)
  return 2 * 8192 ** 3 / seconds / 1e12


# The model's jax.named_scope names, most specific first: an op counts toward the first found.
SCOPES = ("experts", "expert_weights", "router", "shared_experts", "moe", "attention", "mlp",
          "output", "embed", "optimizer")


def hlo_scopes(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "scope, pass" from its op metadata (pass: forward, or backward
  for ops made by transposition)."""
  scopes = {}
  for name, op_name in re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = .*?op_name=\"([^\"]*)\"",
                                  hlo_text, re.MULTILINE):
    parts = set(re.split(r"[/()]", op_name))
    scope = next((s for s in SCOPES if s in parts), "other")
    scopes[name] = f"{scope}, {'backward' if 'transpose(' in op_name else 'forward'}"
  return scopes


def hlo_shapes(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its result's type without layouts (e.g. "bf16[64,1024,768]")."""
  return {name: re.sub(r"\{[^}]*\}", "", shape)
          for name, shape in re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = (\([^)]*\)|\S+) ",
                                        hlo_text, re.MULTILINE)}


def _hlo_key(name: str) -> str:
  return name.replace(".", "_").replace("-", "_")


def top_device_ops(trace_dir: Path, steps_traced: int, scopes: dict[str, str],
                   shapes: dict[str, str] | None = None, count: int = 40) -> None:
  """Prints the busiest device thread of a jax.profiler trace: its ops by time per step, the
  same time by kind of kernel over all layers (with the result's type and launches per step,
  so that one slow kind is not hidden among fast ones of the same name), and by model part
  (the named scope of each op's HLO)."""
  [path] = sorted(trace_dir.rglob("perfetto_trace.json.gz"))[-1:]
  events = json.loads(gzip.open(path).read())["traceEvents"]
  names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
  device_pids = {pid for (pid, tid), name in names.items()
                 if tid is None and ("GPU" in name or "TPU" in name)}
  device_pids = device_pids or {pid for pid, tid in names if tid is None}   # CPU: every thread
  by_thread = collections.defaultdict(collections.Counter)
  launches = collections.defaultdict(collections.Counter)
  scopes = {_hlo_key(name): scope for name, scope in scopes.items()}
  shapes = {_hlo_key(name): shape for name, shape in (shapes or {}).items()}
  for e in events:
    if e.get("ph") == "X" and e["pid"] in device_pids:
      # GPU kernels name their HLO op in args (library kernels) or in their own name (fusions).
      op = _hlo_key(str(e.get("args", {}).get("hlo_op", e["name"])))
      by_thread[(e["pid"], e.get("tid"))][(e["name"], op)] += e.get("dur", 0)
      launches[(e["pid"], e.get("tid"))][(e["name"], op)] += 1
  device_idle([e for e in events if e.get("ph") == "X" and e["pid"] in device_pids
               and names.get((e["pid"], e.get("tid")), "").startswith("Stream")], steps_traced)
  for key, ops in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values()))[:2]:
    total = sum(ops.values())
    by_scope, by_kernel, by_kind = (collections.Counter() for _ in range(3))
    kind_launches = collections.Counter()
    for (kernel, op), micros in ops.items():
      scope = scopes.get(op, "(not an HLO op)")
      by_scope[scope] += micros
      by_kernel[f"{kernel[:70]} [{op[:30]}: {scope}]"] += micros
      # The same kernel in every layer: numbered fusions and ops lose their numbers.
      kind = f"{re.sub(r'[._]?[0-9]+$', '', kernel)[:70]} {shapes.get(op, '')[:48]} [{scope}]"
      by_kind[kind] += micros
      kind_launches[kind] += launches[key][(kernel, op)]
    print(f"  device thread {names.get(key, key)}: {total / steps_traced / 1e3:.1f} ms per step")
    for title, table in (("kernel [op: model part]", by_kernel),
                         ("kernel kind and result, all layers [model part] (launches)", by_kind),
                         ("model part", by_scope)):
      print(f"    by {title}:")
      for name, micros in table.most_common(count):
        per_step = f" ({kind_launches[name] / steps_traced:.3g})" if table is by_kind else ""
        print(f"    {micros / steps_traced / 1e3:8.2f} ms {100 * micros / total:5.1f}%  "
              f"{name}{per_step}")


def device_idle(kernels: list[dict], steps_traced: int, count: int = 12) -> None:
  """Prints how long the device ran nothing (no kernel or copy on any stream) between the
  first and last kernel of the trace, by length of gap, and the longest gaps with the kernels
  on either side: time that no kernel fusion can win back."""
  if not kernels:
    return
  spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in kernels)
  gaps, end, last = [], spans[0][1], spans[0][2]
  for start, stop, name in spans[1:]:
    if start > end:
      gaps.append((start - end, last, name))
    if stop >= end:
      end, last = stop, name
  wall = (end - spans[0][0]) / steps_traced / 1e3
  idle = sum(g for g, _, _ in gaps) / steps_traced / 1e3
  print(f"  device: {wall:.1f} ms per step from first to last kernel, {idle:.1f} ms of it "
        f"idle, {len(spans) / steps_traced:.0f} kernels per step")
  for low, high in ((0, 2), (2, 10), (10, 100), (100, float("inf"))):
    inside = [g for g, _, _ in gaps if low <= g < high]
    print(f"    gaps of {low}-{high} us: {len(inside) / steps_traced:.0f} per step, "
          f"{sum(inside) / steps_traced / 1e3:.2f} ms per step")
  for gap, before, after in sorted(gaps, reverse=True)[:count]:
    print(f"    {gap:8.0f} us after {before[:60]} before {after[:60]}")


def bench(spec: ModelSpec, batch: int, seq_len: int, warmup: int, repeats: int,
          profile_dir: Path | None = None, microbatches: int = 1,
          moment_dtype: str = "float32") -> dict:
  tx = steps.make_optimizer(steps.make_schedule(1e-3, 10, 1000, 0.1), 0.9, 0.95, 0.1, 1.0,
                            steps.MOMENT_DTYPES[moment_dtype])
  graphdef, state = steps.init_state(spec, tx, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   bias_update_rule=spec.balancing.bias_update_rule,
                                   microbatches=microbatches),
                 donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, spec.vocab_size)
  balancing = routing.BalancingValues.of(spec.balancing.replace(bias_update_rate=1e-3))
  start = time.perf_counter()
  compiled = step.lower(state, tokens, None, None, balancing).compile()
  compile_seconds = time.perf_counter() - start
  step = lambda state, tokens: compiled(state, tokens, None, None, balancing)
  memory = compiled.memory_analysis()   # XLA's plan for the step: what the device must hold
  planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**30
  holder = [state]

  def dispatch():
    holder[0], metrics = step(holder[0], tokens)
    holder.append(metrics["loss"])

  def wait():
    jax.block_until_ready(holder[1:])
    del holder[1:]

  one_step = lambda: (dispatch(), wait())
  blocking = median_seconds(one_step, warmup, repeats)
  seconds = seconds_in_a_row(dispatch, wait, repeats)
  if profile_dir is not None:
    with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
      seconds_in_a_row(dispatch, wait, 3, rounds=1)
    hlo = compiled.as_text()
    top_device_ops(profile_dir, 3, hlo_scopes(hlo), hlo_shapes(hlo))
  tokens_per_second = batch * seq_len / seconds
  return {"seconds": seconds, "tokens_per_second": tokens_per_second,
          "model_tflops": model_flops_per_token(spec, seq_len) * tokens_per_second / 1e12,
          "compile_seconds": compile_seconds, "planned_gib": planned, "blocking": blocking}


def _preset(text: str):
  """argparse type: a size of configs/deepseek.py (with its overrides) -> its config."""
  try:
    return get_config(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", type=_preset, default="bench_1b",
                      help="a size of configs/deepseek.py")
  parser.add_argument("--layers", type=arguments.whole_number(0), default=0,
                      help="blocks (0: the preset's), keeping its dense ones")
  parser.add_argument("--microbatches", type=arguments.whole_number(), default=1)
  parser.add_argument("--scan", type=arguments.names("on", "off", "preset"), default="preset",
                      help="comma-separated model.scan_layers values to time: on, off, preset")
  parser.add_argument("--dispatchers", type=arguments.names(*DISPATCHERS),
                      default="capacity,dropless")
  parser.add_argument("--batch", type=arguments.whole_number(), default=8)
  parser.add_argument("--seq", type=arguments.whole_number(2), default=2048)
  parser.add_argument("--warmup", type=arguments.whole_number(0), default=3)
  parser.add_argument("--repeats", type=arguments.whole_number(), default=10)
  parser.add_argument("--peak_tflops", type=arguments.positive_number, default=989.0)
  parser.add_argument("--attention", type=arguments.names(*attention.IMPLEMENTATIONS),
                      default="auto",
                      help="comma-separated attention paths to time: auto, cudnn, xla")
  parser.add_argument("--profile", type=arguments.writable_directory, default=None,
                      help="trace 3 steps of each variant under this folder and print the top ops")
  parser.add_argument("--grouped_matmul", type=arguments.names(*GROUPED_MATMULS),
                      default="auto",
                      help="comma-separated dispatch.grouped_matmul implementations to time")
  parser.add_argument("--remat", type=arguments.names(*REMAT_POLICIES), default="none",
                      help="comma-separated activation-checkpointing policies (model.remat)")
  parser.add_argument("--dense_reference", action="store_true",
                      help="also time a dense model of the same FLOPs per token")
  parser.add_argument("--moment_dtype", type=arguments.names(*steps.MOMENT_DTYPES),
                      default="float32",
                      help="comma-separated Adam moment dtypes (optimizer.moment_dtype) to time")
  parser.add_argument("--loss_logits_dtype", type=arguments.names(*DTYPES), default="float32",
                      help="comma-separated dtypes of the training loss's logits "
                           "(model.loss_logits_dtype) to time")
  args = parser.parse_args()
  if args.batch % args.microbatches:
    parser.error(f"--batch={args.batch} does not split into --microbatches={args.microbatches}")
  spec0 = ModelSpec.from_config(args.preset)
  if args.layers:
    spec0 = spec0.replace(num_layers=args.layers)
  counts = parameter_counts(spec0)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {datetime.date.today()}: "
        f"{counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e9:.3f}B used per token "
        f"({counts['embedding'] / 1e6:.0f}M in embedding and output), batch {args.batch} x "
        f"{args.seq} tokens", flush=True)
  ceiling = matmul_ceiling()
  print(f"bf16 8192^3 matmul: {ceiling:.0f} TFLOP/s", flush=True)
  variants = [(d, spec0.replace(dispatch=spec0.dispatch.replace(strategy=d)))
              for d in args.dispatchers]
  if args.dense_reference:   # every block dense, as wide as the experts a token uses
    width = (spec0.router.top_k + spec0.num_shared_experts) * spec0.expert_dim
    variants.append((f"dense model, MLP width {width} (same FLOPs per token)",
                     spec0.replace(num_dense_layers=spec0.num_layers, dense_mlp_dim=width)))
  rows = []
  for (dispatcher, spec), path, kernels, remat, scan, moments, logits in itertools.product(
      variants, args.attention, args.grouped_matmul, args.remat, args.scan, args.moment_dtype,
      args.loss_logits_dtype):
    name = dispatcher if path == "auto" else f"{dispatcher}, attention {path}"
    name = name if kernels == "auto" else f"{name}, grouped matmul {kernels}"
    name = name if remat == "none" else f"{name}, remat {remat}"
    name = name if moments == "float32" else f"{name}, {moments} moments"
    name = name if logits == "float32" else f"{name}, {logits} loss logits"
    scanned = spec.scan_layers if scan == "preset" else scan == "on"
    name = f"{name}, scan {'on' if scanned else 'off'}"
    profile = args.profile / name.replace(" ", "_").replace(",", "") if args.profile else None
    spec = spec.replace(attention_implementation=path, remat=remat, scan_layers=scanned,
                        loss_logits_dtype=logits,
                        dispatch=spec.dispatch.replace(grouped_matmul=kernels))
    print(f"{name}: attention "
          f"{attention.chosen_implementation(jnp.bfloat16, spec.head_dim, path)}", flush=True)
    result = bench(spec, args.batch, args.seq, args.warmup, args.repeats, profile,
                   args.microbatches, moments)
    rows.append((name, result))
    print(f"  {name}: {result['seconds'] * 1e3:.1f} ms/step in a row "
          f"({result['blocking'] * 1e3:.1f} waiting for each), "
          f"{result['tokens_per_second']:,.0f} tokens/s, {result['model_tflops']:.0f} TFLOP/s, "
          f"compiled in {result['compile_seconds']:.0f} s, planned {result['planned_gib']:.2f} GiB",
          flush=True)
  print("\ncommand: python scripts/bench_train.py " + " ".join(sys.argv[1:]))
  print("| variant | ms / step | waiting for each step | tokens/s | model TFLOP/s | MFU (of peak) "
        "| of measured matmul | compile s | step memory (XLA plan), GiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for dispatcher, r in rows:
    print(f"| {dispatcher} | {r['seconds'] * 1e3:.1f} | {r['blocking'] * 1e3:.1f} | "
          f"{r['tokens_per_second']:,.0f} | "
          f"{r['model_tflops']:.0f} | {100 * r['model_tflops'] / args.peak_tflops:.1f}% | "
          f"{100 * r['model_tflops'] / ceiling:.1f}% | {r['compile_seconds']:.0f} | "
          f"{r['planned_gib']:.2f} |")


if __name__ == "__main__":
  main()
