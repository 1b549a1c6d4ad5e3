"""How the MoE layer moves tokens to its experts (`dispatch` section of a config)."""

import dataclasses

from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT, VARIANTS
from moe_jax.dispatch.strategies import DISPATCHERS
from moe_jax.kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED_MATMULS
from moe_jax.settings import Settings


@dataclasses.dataclass(frozen=True)
class DispatchSettings(Settings):
  """The dispatch strategy, its capacity, and whether the experts are sharded over devices.

  An expert-parallel variant performs one strategy across devices (`all_to_all` is capacity
  dispatch, the others are dropless), so the two fields must agree.
  """

  SECTION = "dispatch"

  strategy: str = "capacity"       # a key of DISPATCHERS (one file each in moe_jax/dispatch/)
  capacity_factor: float = 1.25    # per-expert buffer = factor * tokens * K / E; overflow drops
  expert_parallel: str = "none"    # experts sharded over mesh.expert: "all_to_all" (strategy
                                   # "capacity") | "all_gather" ("dropless") |
                                   # "ragged_all_to_all" (GPU/TPU, "dropless") |
                                   # "token_all_to_all" ("dropless"); "none" replicates
  expert_parallel_chunks: int = 1  # >1: each device's tokens in this many slices, so one
                                   # slice's exchange can overlap another's expert compute
  ragged_capacity_factor: float = 0.0  # ragged_all_to_all: 0 sends every routed row (receive
                                       # buffers for the worst case, P x T x K rows); f > 0 caps
                                       # each expert at ceil(f x T x K / E) of a device's rows
                                       # (lowest gates drop), buffers E x that many
  expert_replicas: int = 0         # spare slots per expert-parallel rank for copies of hot
                                   # experts (all_gather; dispatch/replicas.py); 0: none
  replica_replan_every: int = 100  # steps between replica plans, each from the expert counts
                                   # summed since the last one (made inside the training step)
  grouped_matmul: str = "auto"     # ragged expert matmuls (dropless): a name of
                                   # kernels/grouped_matmul.IMPLEMENTATIONS
  gates_before_down: bool = False  # dropless: gates scale the experts' activations before the
                                   # down projection, not their outputs (less memory, a
                                   # little slower: dispatch/dropless.py)
  fp8_experts: bool = False        # the routed experts' matmuls in e4m3 with DeepSeek-V3's
                                   # 1x128 / 128x128 scaling (kernels/fp8.py; on Hopper
                                   # Mosaic kernels, slower than bf16 for now)

  def on_one_device(self, **changes) -> "DispatchSettings":
    """These settings for a model whose experts all sit on one device (sampling, analysis,
    activation plans): no expert parallelism, so no replicas of hot experts."""
    return self.replace(expert_parallel="none", expert_replicas=0, **changes)

  def problems(self) -> list[str]:
    problems = []
    if self.strategy not in DISPATCHERS:
      problems.append(f"dispatch.strategy={self.strategy!r} is unknown; choose from "
                      f"{sorted(DISPATCHERS)}")
    if self.capacity_factor <= 0:
      problems.append(f"dispatch.capacity_factor={self.capacity_factor} must be > 0")
    if self.expert_parallel_chunks < 1:
      problems.append(f"dispatch.expert_parallel_chunks={self.expert_parallel_chunks} must be >= 1")
    if self.ragged_capacity_factor < 0:
      problems.append(f"dispatch.ragged_capacity_factor={self.ragged_capacity_factor} must be "
                      f">= 0 (0: no cap)")
    elif self.ragged_capacity_factor and self.expert_parallel != "ragged_all_to_all":
      problems.append(f"dispatch.ragged_capacity_factor={self.ragged_capacity_factor} caps the "
                      f"'ragged_all_to_all' variant's exchange, but dispatch.expert_parallel="
                      f"{self.expert_parallel!r}: set it to 0 (dispatch.capacity_factor caps "
                      f"the others)")
    if self.expert_replicas < 0:
      problems.append(f"dispatch.expert_replicas={self.expert_replicas} must be >= 0")
    if self.replica_replan_every < 1:
      problems.append(f"dispatch.replica_replan_every={self.replica_replan_every} must be >= 1")
    if self.expert_replicas and self.expert_parallel != "all_gather":
      problems.append(f"dispatch.expert_replicas={self.expert_replicas} places copies of hot "
                      f"experts on expert-parallel ranks of the 'all_gather' variant, but "
                      f"dispatch.expert_parallel={self.expert_parallel!r}: set "
                      f"dispatch.expert_parallel='all_gather' or dispatch.expert_replicas=0")
    if self.expert_parallel not in ("none", *VARIANTS):
      problems.append(f"dispatch.expert_parallel={self.expert_parallel!r} is unknown; choose "
                      f"from {['none', *VARIANTS]}")
    if self.grouped_matmul not in GROUPED_MATMULS:
      problems.append(f"dispatch.grouped_matmul={self.grouped_matmul!r} is unknown; choose from "
                      f"{list(GROUPED_MATMULS)}")
    if self.gates_before_down and (self.strategy != "dropless" or self.expert_parallel != "none"):
      problems.append(f"dispatch.gates_before_down=True is for dispatch.strategy='dropless' on "
                      f"one device group, but dispatch.strategy={self.strategy!r} and "
                      f"dispatch.expert_parallel={self.expert_parallel!r}: set "
                      f"dispatch.gates_before_down=False")
    implied = DISPATCHER_OF_VARIANT.get(self.expert_parallel)
    if implied and self.strategy != implied:
      problems.append(f"dispatch.expert_parallel={self.expert_parallel!r} dispatches as "
                      f"{implied!r} does, but dispatch.strategy={self.strategy!r}: set "
                      f"dispatch.strategy={implied!r} (all_to_all is capacity dispatch; "
                      f"the other variants are dropless)")
    return problems
