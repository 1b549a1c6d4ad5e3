"""Routing as pure functions: choice (who goes where), balancing (bias, aux losses), stats;
and the settings that pick among them (settings.py)."""

from moe_jax.routing.balancing import (BIAS_RULES, BalancingValues, relative_load,
                                       sequence_balance_loss, switch_loss, update_balancing_bias,
                                       z_loss)
from moe_jax.routing.choice import (GROUP_SCORES, SCORE_FUNCTIONS, ExpertChoice, Routing,
                                    expert_choice_route, expert_counts, group_limited_mask,
                                    scores, top_k_indices, topk_route)
from moe_jax.routing.settings import ROUTERS, BalancingSettings, RouterSettings
from moe_jax.routing.stats import (chosen_mask, coactivation, dead_experts, expert_choice_mask,
                                   max_violation, router_entropy, routing_confidence)
