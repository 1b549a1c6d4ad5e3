"""How tokens are matched to experts (`router` section) and how the experts' load is balanced
(`balancing` section): the settings the MoE layer and the training step read.

Checks that need another section (top_k against the number of experts, groups dividing the
experts) are in config_validation.py; each class checks its own fields.
"""

import dataclasses

from moe_jax.routing.balancing import BIAS_RULES
from moe_jax.routing.choice import GROUP_SCORES
from moe_jax.settings import Settings

# router.score_function -> how tokens and experts are matched.
ROUTERS = {
    "sigmoid": "token choice on sigmoid scores (DeepSeek-V3)",
    "softmax": "token choice on softmax probabilities (Switch, GShard, DeepSeek-V2)",
    "expert_choice": "each expert takes its top tokens (Zhou et al. 2022); not causal",
}


@dataclasses.dataclass(frozen=True)
class RouterSettings(Settings):
  """Which experts each token uses and with what weights. The fields are `topk_route`'s
  keyword arguments (moe_jax/routing/choice.py), which the MoE layer passes as they are: a
  new routing option is a field here and an argument there."""

  SECTION = "router"

  score_function: str = "sigmoid"  # a key of ROUTERS
  top_k: int = 2                   # routed experts per token K (expert choice: K x tokens / E
                                   # tokens per expert, times the dispatch capacity factor)
  norm_topk_prob: bool = True      # renormalise the chosen gates to sum 1
  route_scale: float = 1.0         # gates are multiplied by this
  num_groups: int = 1              # group-limited routing: experts split into this many groups...
  topk_groups: int = 1             # ...of which each token may use the best this many
  group_score: str = "top2_sum"    # "top2_sum" of biased scores (DeepSeek-V3) | "max" (V2)

  @property
  def expert_choice(self) -> bool:
    return self.score_function == "expert_choice"

  def problems(self) -> list[str]:
    problems = []
    if self.score_function not in ROUTERS:
      problems.append(f"router.score_function={self.score_function!r} is unknown; choose from "
                      f"{sorted(ROUTERS)}")
    if self.top_k < 1:
      problems.append(f"router.top_k={self.top_k} must be >= 1")
    if self.route_scale <= 0:
      problems.append(f"router.route_scale={self.route_scale} must be > 0")
    if self.group_score not in GROUP_SCORES:
      problems.append(f"router.group_score={self.group_score!r} is unknown; choose from "
                      f"{list(GROUP_SCORES)}")
    if self.num_groups < 1:
      problems.append(f"router.num_groups={self.num_groups} must be >= 1")
    elif not 1 <= self.topk_groups <= self.num_groups:
      problems.append(f"router.topk_groups={self.topk_groups} must be between 1 and "
                      f"router.num_groups={self.num_groups}")
    if self.num_groups > 1 and self.expert_choice:
      problems.append("router.num_groups > 1 is for token-choice routers, not "
                      "router.score_function='expert_choice'")
    return problems


@dataclasses.dataclass(frozen=True)
class BalancingSettings(Settings):
  """Keeping the experts' load even: DeepSeek-V3's aux-loss-free bias (updated by the training
  step from the global batch's counts) and the auxiliary losses the MoE layer adds."""

  SECTION = "balancing"

  bias_update_rate: float = 0.0    # gamma of the bias update (0: off); DeepSeek-V3 used 1e-3
  bias_update_rule: str = "sign"   # "sign": b += gamma*sign(mean-load) | "proportional"
  bias_freeze_step: int = -1       # the bias changes in steps 1..this, then stays (-1: never)
  switch_loss_alpha: float = 0.0   # Switch balance loss alpha*E*sum f_i P_i
  sequence_loss_alpha: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (V3 used 1e-4)
  z_loss_coef: float = 0.0         # router z-loss (ST-MoE used 1e-3)

  def problems(self) -> list[str]:
    problems = [f"balancing.{name}={getattr(self, name)} must be >= 0"
                for name in ("bias_update_rate", "switch_loss_alpha", "sequence_loss_alpha",
                             "z_loss_coef") if getattr(self, name) < 0]
    if self.bias_update_rule not in BIAS_RULES:
      problems.append(f"balancing.bias_update_rule={self.bias_update_rule!r} is unknown; choose "
                      f"from {list(BIAS_RULES)}")
    if self.bias_freeze_step < -1:
      problems.append(f"balancing.bias_freeze_step={self.bias_freeze_step} must be -1 (never) "
                      f"or >= 0")
    return problems
