"""Pipeline step time: each schedule over all local devices against the unpipelined step on one.

  python scripts/bench_pipeline.py                        # bench_1b with 16 MoE blocks, batch 16
  python scripts/bench_pipeline.py --schedules=1f1b,1f1b:9/7,dualpipev:4/5/4/3 --microbatches=8
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/bench_pipeline.py \
      --config=configs/default.py:tiny --layers=5 --batch=8 --seq=64   # a CPU smoke test
  python scripts/bench_pipeline.py --expert=2 --expert_parallel=all_to_all --chunks=1,2
      # on 4 devices: stage 2 x expert 2, the expert exchange without and with overlap

One full training step (`steps.train_step`: forward, backward, AdamW, bias update) of the
config's model with scanned layers, the batch in --microbatches slices: first unpipelined on
one device (gradient accumulation over the slices), then for each schedule with the MoE blocks
as stages over every local device (`mesh.stage` = device count). Times are medians of
--repeats steps after --warmup. Per schedule the table gives the bubble `simulate` computes
(a backward twice a forward), the one the runner's lockstep ticks leave with the same costs
(`scheduled.lockstep_bubble`), and the effective one, 1 - T1 / (D x T_D): the share of the D
devices' time that the pipelined step spends beyond a perfect split of the one-device step's
work (bubbles, the transfers between stages, and the runner's recomputation of each stage's
forward in its backward all land there). With --expert=E the devices form stage x expert
(D / E stages), the unpipelined step runs on E devices, and --expert_parallel names the
dispatch inside the stages; --chunks runs it with each `dispatch.expert_parallel_chunks` (1:
the exchange waits for the experts; more: one slice's exchange may overlap another's experts).
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments   # noqa: E402
from moe_jax import parallel, steps   # noqa: E402
from moe_jax.config_validation import validate_config   # noqa: E402
from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT, VARIANTS   # noqa: E402
from moe_jax.layers.attention import IMPLEMENTATIONS   # noqa: E402
from moe_jax.main import config_file_problem   # noqa: E402
from moe_jax.settings import ConfigError   # noqa: E402
from moe_jax.paths import load_config   # noqa: E402
from moe_jax.pipeline import schedules   # noqa: E402
from moe_jax.pipeline.scheduled import lockstep_bubble, tick_table   # noqa: E402
from moe_jax.train import (jit_train_step, laid_out_state, pipeline_of,   # noqa: E402
                           step_arguments_on)


def step_ms(config, devices, warmup: int, repeats: int) -> float:
  """Median ms of the config's training step on `devices` (mesh.expert of them along `expert`,
  the rest along `stage`)."""
  expert = config.mesh.expert
  mesh = parallel.make_mesh(1, expert, devices, stage=len(devices) // expert)
  with jax.set_mesh(mesh):
    spec, _, tx, graphdef, abstract_state, shardings, rules = laid_out_state(config, mesh)
    state = jax.jit(lambda: steps.init_state(spec, tx, 0)[1], out_shardings=shardings)()
    step = jit_train_step(spec, graphdef, tx, shardings, config.train.microbatches,
                          pipeline_of(config, mesh))
    run_values = step_arguments_on(config, mesh)
    tokens = jax.random.randint(jax.random.key(1), (config.data.batch_size,
                                                    config.data.seq_len + 1), 0,
                                spec.vocab_size)
    tokens = jax.device_put(tokens, parallel.batch_sharding(mesh, rules["batch"]))
    times = []
    for i in range(warmup + repeats):
      start = time.perf_counter()
      state, metrics = step(state, tokens, *run_values)
      jax.block_until_ready(metrics["loss"])
      if i >= warmup:
        times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/deepseek.py:bench_1b")
  parser.add_argument("--layers", type=arguments.whole_number(2), default=17,
                      help="blocks (the preset's dense ones first); 17 leaves 16 MoE blocks")
  parser.add_argument("--batch", type=arguments.whole_number(), default=16)
  parser.add_argument("--seq", type=arguments.whole_number(2), default=2048)
  parser.add_argument("--microbatches", type=arguments.whole_number(), default=8)
  parser.add_argument("--schedules", default="gpipe,1f1b,dualpipev",
                      help="schedules, each optionally with its MoE blocks per stage "
                           "(pipeline.stage_blocks): 1f1b,1f1b:9/7,dualpipev:4/5/4/3")
  parser.add_argument("--expert", type=arguments.whole_number(), default=1,
                      help="devices along the expert axis (the rest are stages)")
  parser.add_argument("--expert_parallel", choices=VARIANTS, default=None,
                      help="dispatch.expert_parallel with --expert > 1")
  parser.add_argument("--chunks", type=arguments.whole_numbers(), default="1",
                      help="dispatch.expert_parallel_chunks to run each schedule with")
  parser.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                      help="model.attention_implementation (auto: cuDNN's on NVIDIA GPUs)")
  parser.add_argument("--warmup", type=arguments.whole_number(0), default=2)
  parser.add_argument("--repeats", type=arguments.whole_number(), default=5)
  args = parser.parse_args()
  problem = config_file_problem(args.config)
  if problem:
    parser.error(problem)
  config = load_config(args.config)
  config.model.update(num_layers=args.layers, scan_layers=True, mtp_depth=0,
                      attention_implementation=args.attention)
  config.data.update(batch_size=args.batch, seq_len=args.seq)
  config.train.microbatches = args.microbatches
  if (args.expert > 1) != (args.expert_parallel is not None):
    parser.error("--expert above 1 and --expert_parallel go together")
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=args.expert)
  if args.expert_parallel:
    config.dispatch.update(expert_parallel=args.expert_parallel,
                           strategy=DISPATCHER_OF_VARIANT[args.expert_parallel])
  devices = jax.devices()
  stage_count = len(devices) // args.expert
  if stage_count < 2:
    parser.error(f"--expert={args.expert} leaves {stage_count} stage(s) on {len(devices)} "
                 f"devices: a pipeline needs 2 or more")
  # Every schedule's config checked before anything is compiled: one line for a bad one.
  stage_configs = []
  for item in args.schedules.split(","):
    name, _, blocks = item.partition(":")
    for chunks in args.chunks:
      stage_config = config.copy_and_resolve_references()
      stage_config.mesh.stage, stage_config.pipeline.schedule = stage_count, name
      stage_config.pipeline.stage_blocks = blocks.replace("/", ",")
      stage_config.dispatch.expert_parallel_chunks = chunks
      try:
        validate_config(stage_config, stage_count * args.expert)
      except ConfigError as error:
        parser.error(f"--schedules item {item!r}: {error}")
      stage_configs.append((item, name, chunks, stage_config))
  config.mesh.stage = 1
  try:
    validate_config(config, args.expert)
  except ConfigError as error:
    parser.error(str(error))
  used = devices[:stage_count * args.expert]
  print(f"{len(used)} x {devices[0].device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today()}: {args.config}, {args.layers} blocks, batch {args.batch} x "
        f"{args.seq}, {args.microbatches} micro-batches, expert axis {args.expert} "
        f"({args.expert_parallel or 'no expert-parallel dispatch'})", flush=True)
  one = step_ms(config, used[:args.expert], args.warmup, args.repeats)
  print(f"unpipelined, {args.expert} device(s): {one:.1f} ms", flush=True)
  rows = [("unpipelined (gradient accumulation)", args.expert, "-", one, None, None, None)]
  for item, name, chunks, stage_config in stage_configs:
    ms = step_ms(stage_config, used, args.warmup, args.repeats)
    plan = schedules.make(name, stage_count, args.microbatches)
    computed = schedules.simulate(plan).bubble_fraction
    lockstep = lockstep_bubble(tick_table(plan))
    effective = 1 - one / (stage_count * ms)
    rows.append((item, len(used), chunks, ms, computed, lockstep, effective))
    print(f"{item}, {len(used)} devices, {chunks} chunk(s): {ms:.1f} ms, bubble computed "
          f"{100 * computed:.1f}% (lockstep ticks {100 * lockstep:.1f}%), effective "
          f"{100 * effective:.1f}%", flush=True)
  print("\ncommand: python scripts/bench_pipeline.py " + " ".join(sys.argv[1:]))
  print("| schedule | devices | expert-parallel chunks | ms / step | bubble, computed "
        "| in lockstep ticks | effective (1 - T1 / (S T)) |")
  print("|---|---|---|---|---|---|---|")
  percent = lambda v: "-" if v is None else f"{100 * v:.1f}%"
  for name, count, chunks, ms, computed, lockstep, effective in rows:
    print(f"| {name} | {count} | {chunks} | {ms:.1f} | {percent(computed)} | "
          f"{percent(lockstep)} | {percent(effective)} |")


if __name__ == "__main__":
  main()
