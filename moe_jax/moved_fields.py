"""Config fields that moved out of `model` into sections of their own: old name -> new name.

Configs saved by older runs are read through `config_validation.upgrade_saved_config`; a config
file or command line that still uses an old name is told the new one. Kept apart from the
settings classes (and free of jax) so that the command line can name a moved field without
importing the model.
"""

ROUTER_FIELDS = ("top_k", "norm_topk_prob", "route_scale", "num_groups", "topk_groups",
                 "group_score")
BALANCING_FIELDS = ("bias_update_rate", "bias_update_rule", "bias_freeze_step",
                    "switch_loss_alpha", "sequence_loss_alpha", "z_loss_coef")
DISPATCH_FIELDS = ("capacity_factor", "expert_parallel", "expert_parallel_chunks")

MOVED = {
    **{f"model.{name}": f"router.{name}" for name in ROUTER_FIELDS},
    "model.router": "router.score_function",
    **{f"model.{name}": f"balancing.{name}" for name in BALANCING_FIELDS},
    **{f"model.{name}": f"dispatch.{name}" for name in DISPATCH_FIELDS},
    "model.dispatcher": "dispatch.strategy",
}
