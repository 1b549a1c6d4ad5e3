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

  def problems(self) -> list[str]:
    if self.schedule not in SCHEDULES:
      return [f"pipeline.schedule={self.schedule!r} is unknown; choose from {list(SCHEDULES)}"]
    return []

  def stages(self, stage_devices: int) -> int:
    """Pipeline stages over `stage_devices` devices: one each, two for DualPipeV's V."""
    return stage_devices * (2 if self.schedule == "dualpipev" else 1)

  def min_microbatches(self, stage_devices: int) -> int:
    """The fewest micro-batches the schedule runs on: DualPipeV's 2 x devices, else 1."""
    return 2 * stage_devices if self.schedule == "dualpipev" else 1
