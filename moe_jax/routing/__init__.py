"""Routing as pure functions: choice (who goes where), balancing (bias, aux losses), stats."""

from moe_jax.routing.balancing import (BIAS_RULES, relative_load, sequence_balance_loss,
                                       switch_loss, update_balancing_bias, z_loss)
from moe_jax.routing.choice import (GROUP_SCORES, SCORE_FUNCTIONS, ExpertChoice, Routing,
                                    expert_choice_route, expert_counts, group_limited_mask,
                                    scores, topk_route)
from moe_jax.routing.stats import (chosen_mask, coactivation, dead_experts, max_violation, router_entropy,
                                   routing_confidence)

# model.router -> how tokens and experts are matched.
ROUTERS = {
    "sigmoid": "token choice on sigmoid scores (DeepSeek-V3)",
    "softmax": "token choice on softmax probabilities (Switch, GShard, DeepSeek-V2)",
    "expert_choice": "each expert takes its top tokens (Zhou et al. 2022); not causal",
}
