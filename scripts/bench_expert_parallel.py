"""Expert parallelism across the local devices: weak scaling of the MoE layer, the time beyond
the one-device layer with and without chunked overlap, the exchange's bandwidth against a plain
all_to_all, and replicas of hot experts under skewed routing. Prints markdown tables.

  python scripts/bench_expert_parallel.py                  # shape b, 16K tokens per device
  python scripts/bench_expert_parallel.py --shapes=a,b --chunks=1,2,4 --replicas=0,1,2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_expert_parallel.py \
      --shapes=tiny --tokens=256 --variants=all_to_all,all_gather   # a smoke test on CPU

The layer is `bench_moe.py`'s (router, dispatch, routed SwiGLU experts, bfloat16 with float32
parameters, forward and backward). Weak scaling: one device runs T tokens through all E
experts (`capacity` for the `all_to_all` variant, which is capacity dispatch across devices,
`dropless` for the others); P devices run P x T tokens, T each, the experts split over the
`expert` axis. Efficiency = one-device time / P-device time, so 1 - efficiency is the
share of the P-device step spent beyond the one device's work: the exchanges and their
waits (the grouped matmuls do the same rows either way). Skewed routing (bench_moe's Zipf bias)
loads the ranks unevenly; `--replicas=R` plans R spare slots per rank from the batch's own
counts (`dispatch/replicas.py`) for the `all_gather` variant. Each time is the median of
--repeats runs after --warmup runs.
"""

import argparse
import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arguments   # noqa: E402
from bench_moe import SHAPES, layer_step, median_ms, moe_layer   # noqa: E402
from moe_jax import parallel   # noqa: E402
from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT, TOKEN_AXES   # noqa: E402
from moe_jax.dispatch.replicas import plan_replicas, rank_loads, unreplicated   # noqa: E402


def one_device_ms(shape, tokens, dispatcher, skew, warmup, repeats) -> float:
  d, e, f, k, _ = SHAPES[shape]
  fn, params = layer_step(moe_layer(d, e, f, k, dispatcher, skew))
  x = jax.random.normal(jax.random.key(1), (1, tokens, d), jnp.bfloat16)
  return median_ms(fn, params, x, warmup=warmup, repeats=repeats)


def expert_parallel_ms(shape, tokens, variant, chunks, skew, replicas, mesh, warmup, repeats):
  """(ms per step, busiest rank's assignments / mean rank's) of the layer on `mesh`, one
  sequence of `tokens` per device; `replicas` spare slots per rank planned from the batch."""
  d, e, f, k, _ = SHAPES[shape]
  ranks = mesh.shape["expert"]
  build = lambda **more: moe_layer(d, e, f, k, DISPATCHER_OF_VARIANT[variant], skew,
                                   expert_parallel=variant, expert_parallel_chunks=chunks, **more)
  layer = build()
  x = jax.random.normal(jax.random.key(1), (ranks, tokens, d), jnp.bfloat16)
  with jax.set_mesh(mesh):
    x = jax.device_put(x, NamedSharding(mesh, P(TOKEN_AXES)))
    counts = np.asarray(jax.jit(lambda x: jnp.sum(layer.route(layer.router_logits(x)).counts, 0))(x),
                        np.float64)   # the router alone: one device's small program
    plan = unreplicated(e, ranks)
    if replicas:   # the same weights and routing (same seed), with the batch's own plan
      plan = plan_replicas(counts, ranks, replicas)
      layer = build(expert_replicas=replicas)
      layer.replica_slots[...] = jnp.full((e, replicas), -1, jnp.int32).at[:ranks].set(
          jnp.asarray(plan.spare, jnp.int32))
    fn, params = layer_step(layer)
    params = jax.device_put(params, jax.tree.map(lambda p: NamedSharding(
        mesh, P("expert") if p.ndim == 3 else P()), params))
    ms = median_ms(fn, params, x, warmup=warmup, repeats=repeats)
  loads = rank_loads(counts, plan)
  return ms, float(loads.max() / loads.mean())


def all_to_all_gib_s(mib_per_device: int, mesh, warmup, repeats) -> tuple[float, float]:
  """(ms, GiB/s leaving each device) of one plain all_to_all over `expert` of `mib` MiB of
  bfloat16 per device: (P - 1) / P of it crosses to other devices."""
  ranks = mesh.shape["expert"]
  width = mib_per_device * 2**20 // 2 // ranks
  exchange = jax.jit(jax.shard_map(
      lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True),
      mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
  a = jax.device_put(jnp.ones((ranks * ranks, width), jnp.bfloat16),
                     NamedSharding(mesh, P("expert")))
  ms = median_ms(exchange, a, warmup=warmup, repeats=repeats)
  crossing = mib_per_device / 1024 * (ranks - 1) / ranks
  return ms, crossing / (ms / 1e3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", type=arguments.names(*SHAPES), default="b")
  parser.add_argument("--tokens", type=arguments.whole_number(), default=16384,
                      help="tokens per device")
  parser.add_argument("--variants", type=arguments.names(*DISPATCHER_OF_VARIANT),
                      default="all_to_all,token_all_to_all,all_gather,ragged_all_to_all")
  parser.add_argument("--chunks", type=arguments.whole_numbers(), default="1,2")
  parser.add_argument("--replicas", type=arguments.whole_numbers(0), default="0,1",
                      help="spare slots per rank (all_gather, skewed)")
  parser.add_argument("--routing", type=arguments.names("balanced", "skewed"),
                      default="balanced,skewed")
  parser.add_argument("--bandwidth_mib", type=arguments.whole_number(), default=256)
  parser.add_argument("--warmup", type=arguments.whole_number(0), default=3)
  parser.add_argument("--repeats", type=arguments.whole_number(), default=10)
  args = parser.parse_args()
  devices = jax.device_count()
  mesh = parallel.make_mesh(1, devices)
  print(f"{devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today()}", flush=True)
  ms, gib_s = all_to_all_gib_s(args.bandwidth_mib, mesh, args.warmup, args.repeats)
  print(f"plain all_to_all of {args.bandwidth_mib} MiB per device: {ms:.2f} ms, "
        f"{gib_s:.1f} GiB/s leaving each device", flush=True)
  variants, chunk_counts = args.variants, args.chunks
  rows = []
  for shape in args.shapes:
    for routing in args.routing:
      skew = routing == "skewed"
      single = {}
      for variant in variants:
        dispatcher = DISPATCHER_OF_VARIANT[variant]
        if dispatcher not in single:
          single[dispatcher] = one_device_ms(shape, args.tokens, dispatcher, skew, args.warmup,
                                             args.repeats)
          print(f"{shape} {routing}: one device, {dispatcher}: {single[dispatcher]:.2f} ms",
                flush=True)
        slot_counts = args.replicas if (
            skew and variant == "all_gather") else [0]
        for chunks in chunk_counts:
          for slots in slot_counts if chunks == 1 else [0]:
            try:
              ms, busiest = expert_parallel_ms(shape, args.tokens, variant, chunks, skew, slots,
                                               mesh, args.warmup, args.repeats)
            except Exception as error:   # noqa: BLE001 - e.g. out of memory: report, go on
              print(f"  {variant} chunks={chunks} replicas={slots}: failed: "
                    f"{str(error)[:1500]}", flush=True)
              continue
            efficiency = single[dispatcher] / ms
            rows.append((shape, routing, variant, chunks, slots, busiest, single[dispatcher], ms,
                         efficiency))
            print(f"  {variant} chunks={chunks} replicas={slots}: {ms:.2f} ms, weak-scaling "
                  f"efficiency {100 * efficiency:.1f}%, busiest rank / mean {busiest:.2f}",
                  flush=True)
  print(f"\nMoE layer, forward + backward, {args.tokens} tokens per device, experts over "
        f"{devices} devices (plain all_to_all of {args.bandwidth_mib} MiB: {gib_s:.1f} GiB/s)")
  print("| shape | routing | variant | chunks | spare slots | busiest rank / mean | one device "
        "| expert parallel | weak scaling | beyond one device's time |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for shape, routing, variant, chunks, slots, busiest, one, ms, eff in rows:
    print(f"| {shape} | {routing} | {variant} | {chunks} | {slots} | {busiest:.2f} | {one:.2f} ms "
          f"| {ms:.2f} ms | {100 * eff:.1f}% | {100 * (1 - eff):.1f}% |")


if __name__ == "__main__":
  main()
