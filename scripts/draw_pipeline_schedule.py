"""Draws pipeline schedules (moe_jax/pipeline/schedules.py) as timelines and prints their bubbles.

  python scripts/draw_pipeline_schedule.py --devices=4 --microbatches=10 --out=schedules.png
  python scripts/draw_pipeline_schedule.py --schedules=dualpipev --forward=1 --backward=1 \\
      --weight=0.5 --overlapped=2.0

One row per device, one box per operation, at the times `simulate` gives for the costs given:
forwards blue, full backwards orange, input gradients red, weight gradients green, each with its
micro-batch; the two operations of an overlapped slot share its box, one above the other. A
device's second stage (DualPipeV) is drawn in a lighter shade. The table printed gives each
schedule's makespan, idle time per device, bubble fraction and peak activations per device.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt   # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments   # noqa: E402
from moe_jax.pipeline import schedules   # noqa: E402

COLOURS = {"F": "#4C72B0", "BW": "#DD8452", "B": "#C44E52", "W": "#55A868"}


def draw(axis, schedule: schedules.Schedule, timeline: schedules.Timeline) -> None:
  for device, slots in enumerate(schedule.slots):
    for slot, start, end in zip(slots, timeline.starts[device], timeline.ends[device]):
      height = 0.8 / len(slot)
      for i, op in enumerate(slot):
        second_stage = op.stage != schedule.stages_of_device[device][0]
        bottom = device - 0.4 + i * height
        axis.add_patch(plt.Rectangle((start, bottom), end - start, height,
                                     facecolor=COLOURS[op.kind], edgecolor="black", linewidth=0.5,
                                     alpha=0.55 if second_stage else 1.0))
        axis.text((start + end) / 2, bottom + height / 2, str(op.microbatch), ha="center",
                  va="center", fontsize=6)
  axis.set_xlim(0, timeline.makespan)
  axis.set_ylim(len(schedule.slots) - 0.5, -0.5)
  axis.set_yticks(range(len(schedule.slots)))
  axis.set_yticklabels([f"device {d}: stages {','.join(map(str, stages))}"
                        for d, stages in enumerate(schedule.stages_of_device)], fontsize=7)
  axis.set_title(f"{schedule.name}: {schedule.num_stages} stages, {schedule.num_microbatches} "
                 f"micro-batches, bubble {100 * timeline.bubble_fraction:.1f}%", fontsize=9)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--schedules", type=arguments.names(*schedules.SCHEDULES),
                      default=",".join(schedules.SCHEDULES))
  parser.add_argument("--devices", type=arguments.whole_number(), default=4)
  parser.add_argument("--microbatches", type=arguments.whole_number(), default=10)
  parser.add_argument("--forward", type=arguments.positive_number, default=1.0,
                      help="time of one forward")
  parser.add_argument("--backward", type=arguments.positive_number, default=1.0,
                      help="time of one input gradient")
  parser.add_argument("--weight", type=arguments.positive_number, default=1.0,
                      help="time of one weight gradient")
  parser.add_argument("--overlapped", type=arguments.positive_number, default=None,
                      help="time of a forward and a backward run together (default: their sum)")
  parser.add_argument("--out", type=arguments.writable_file(".png", ".pdf", ".svg"),
                      default="pipeline_schedules.png", help="the picture: .png, .pdf or .svg")
  args = parser.parse_args(argv)
  costs = schedules.Costs(args.forward, args.backward, args.weight, args.overlapped)
  try:
    chosen = [schedules.make(name, args.devices, args.microbatches)
              for name in args.schedules]
    timelines = [schedules.simulate(schedule, costs) for schedule in chosen]
  except schedules.ScheduleError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  figure, axes = plt.subplots(len(chosen), 1, figsize=(12, 1.2 + 0.45 * args.devices * len(chosen)),
                              squeeze=False)
  for axis, schedule, timeline in zip(axes[:, 0], chosen, timelines):
    draw(axis, schedule, timeline)
  axes[-1, 0].set_xlabel(f"time (forward {args.forward:g}, input gradient {args.backward:g}, "
                         f"weight gradient {args.weight:g})")
  figure.tight_layout()
  figure.savefig(args.out, dpi=120)
  print("| schedule | stages | makespan | idle per device | bubble | peak activations per device |")
  print("|---|---|---|---|---|---|")
  for schedule, timeline in zip(chosen, timelines):
    print(f"| {schedule.name} | {schedule.num_stages} | {timeline.makespan:g} | "
          f"{', '.join(f'{t:g}' for t in timeline.idle)} | "
          f"{100 * timeline.bubble_fraction:.1f}% | "
          f"{', '.join(map(str, schedules.peak_activations(schedule)))} |")
  print(f"drawn in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
