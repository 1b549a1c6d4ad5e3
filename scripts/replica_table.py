"""What replicas of hot experts do to the busiest expert-parallel rank, on measured routing.

  python scripts/replica_table.py
  python scripts/replica_table.py --loads=experiments/results/load_balancing_gpu/expert_loads.json \
      --ranks=4,8 --slots=1,2,4

Reads expert counts per run and MoE layer (a sweep's `expert_loads.json`: each run's
validation counts, [layers][experts]), plans replicas for each layer with
`dispatch.replicas.plan_replicas` (experts split over --ranks expert-parallel ranks, --slots
spare slots per rank) and prints, per run, rank count and slot count, the busiest rank's tokens
over the mean rank's (1.00: perfectly even), averaged over the layers, without and with the
replicas, and how much the busiest rank's token count falls.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax.dispatch.replicas import plan_replicas, rank_loads, unreplicated   # noqa: E402


def busiest_over_mean(counts, plan) -> float:
  loads = rank_loads(counts, plan)
  return float(loads.max() / loads.mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--loads",
                      default="experiments/results/load_balancing_gpu/expert_loads.json")
  parser.add_argument("--runs", default="none_seed0,switch_1e-3_seed0,aux_free_1e-3_seed0",
                      help="runs of the file to tabulate ('' for all)")
  parser.add_argument("--ranks", default="4,8")
  parser.add_argument("--slots", default="1,2,4")
  args = parser.parse_args()
  loads = json.loads(Path(args.loads).read_text())
  runs = [r for r in args.runs.split(",") if r] or list(loads)
  missing = [r for r in runs if r not in loads]
  if missing:
    parser.error(f"--runs: {missing} not in {args.loads}; it holds {list(loads)}")
  print(f"{args.loads}: busiest rank's tokens / mean rank's, mean over each run's MoE layers")
  print("| run | ranks | spare slots per rank | without replicas | with | busiest rank's tokens |")
  print("|---|---|---|---|---|---|")
  for run in runs:
    layers = [np.asarray(counts, np.float64) for counts in loads[run]]
    for ranks in map(int, args.ranks.split(",")):
      before = np.mean([busiest_over_mean(c, unreplicated(len(c), ranks)) for c in layers])
      for slots in map(int, args.slots.split(",")):
        plans = [plan_replicas(c, ranks, slots) for c in layers]
        after = np.mean([busiest_over_mean(c, p) for c, p in zip(layers, plans)])
        print(f"| {run} | {ranks} | {slots} | {before:.2f} | {after:.2f} | "
              f"{100 * (after / before - 1):+.0f}% |")


if __name__ == "__main__":
  main()
