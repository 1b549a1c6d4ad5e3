"""Pipeline parallelism's settings (`pipeline` section): which schedule runs the stages.

The stage count is the mesh's `stage` axis (`mesh.stage`; 1: no pipeline) and the micro-batch
count `train.microbatches`: the pipeline's micro-batches are the slices gradient accumulation
would take, so a pipelined step computes what the unpipelined step with as many slices does.
Read by moe_jax/pipeline/training.py; the combinations it cannot run are refused in
config_validation.py.
"""

import dataclasses

from moe_jax.pipeline.schedules import SCHEDULES
from moe_jax.settings import Settings


@dataclasses.dataclass(frozen=True)
class PipelineSettings(Settings):

  SECTION = "pipeline"

  schedule: str = "1f1b"    # a name of schedules.SCHEDULES: "gpipe", "1f1b" or "dualpipev"
  stage_blocks: str = ""    # MoE blocks per stage, first stage first ("9,7"); "": even split

  def problems(self) -> list[str]:
    problems = []
    if self.schedule not in SCHEDULES:
      problems.append(f"pipeline.schedule={self.schedule!r} is unknown; choose from "
                      f"{list(SCHEDULES)}")
    items = self.stage_blocks.split(",") if self.stage_blocks.strip() else []
    if not all(item.strip().isdigit() and int(item) > 0 for item in items):
      problems.append(f"pipeline.stage_blocks={self.stage_blocks!r} must list each stage's "
                      f"MoE block count, positive integers separated by commas (e.g. '9,7'), "
                      f"or be '' for an even split")
    return problems

  def block_counts(self, stages: int, moe_blocks: int) -> tuple[int, ...]:
    """MoE blocks per stage: `stage_blocks`, or `moe_blocks` split evenly into `stages`.
    An uneven split gives the last stage, which also computes the output head and the loss,
    fewer blocks: the stages then take about the same time."""
    if self.stage_blocks.strip():
      return tuple(int(item) for item in self.stage_blocks.split(","))
    return (moe_blocks // stages,) * stages

  def stages(self, stage_devices: int) -> int:
    """Pipeline stages over `stage_devices` devices: one each, two for DualPipeV's V."""
    return stage_devices * (2 if self.schedule == "dualpipev" else 1)

  def min_microbatches(self, stage_devices: int) -> int:
    """The fewest micro-batches the schedule runs on: DualPipeV's 2 x devices, else 1."""
    return 2 * stage_devices if self.schedule == "dualpipev" else 1
