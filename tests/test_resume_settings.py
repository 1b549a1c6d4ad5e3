"""Which settings a checkpoint is checked against: only those that shape the parameters
(`ModelSpec.parameter_settings`), so a run resumes after changing how it computes."""

import jax
import pytest
from flax import nnx

from moe_jax.model import PARAMETER_FIELDS, ModelSpec, abstract_model
from moe_jax.layers.moe import BalancingBias
from tests.model_variants import SMALL, VARIANTS

# Another valid value of each field (valid in every variant above).
OTHER = {
    "vocab_size": 80, "d_model": 48, "num_layers": 4, "num_dense_layers": 2, "attention": "mla",
    "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "q_lora_rank": 8, "kv_lora_rank": 24,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 4, "v_head_dim": 16, "qkv_bias": True,
    "qk_norm": "whole", "dense_mlp_dim": 40, "num_routed_experts": 4, "num_shared_experts": 2,
    "shared_expert_gate": True, "expert_dim": 24, "mtp_depth": 2,
    "rope_theta": 500.0, "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_len": 16,
    "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0, "yarn_mscale": 0.7, "yarn_mscale_all_dim": 0.5,
    "norm_eps": 1e-5, "compute_dtype": "bfloat16", "loss_logits_dtype": "bfloat16",
    "attention_implementation": "xla",
    "remat": "block", "scan_layers": True, "mtp_loss_weight": 0.5,
    "mtp_loss_weight_final": 0.2, "mtp_weight_switch_fraction": 0.5,
}
# Other values of the settings the MoE layers read (pairs that must agree change together).
OTHER_SETTINGS = {
    "router": [{"top_k": 1}, {"score_function": "softmax"}, {"route_scale": 2.5},
               {"norm_topk_prob": False}, {"num_groups": 2, "topk_groups": 2},
               {"group_score": "max"}, {"score_function": "expert_choice"}],
    "balancing": [{"bias_update_rate": 0.0}, {"bias_update_rule": "proportional"},
                  {"bias_freeze_step": 5}, {"switch_loss_alpha": 0.01},
                  {"sequence_loss_alpha": 0.001}, {"z_loss_coef": 0.001}],
    "dispatch": [{"strategy": "dropless"}, {"strategy": "dense"}, {"capacity_factor": 2.0},
                 {"strategy": "dropless", "expert_parallel": "all_gather"},
                 {"expert_parallel": "all_to_all", "expert_parallel_chunks": 2},
                 {"strategy": "dropless", "expert_parallel": "ragged_all_to_all",
                  "ragged_capacity_factor": 1.0},
                 {"strategy": "dropless", "expert_parallel": "all_gather", "expert_replicas": 1,
                  "replica_replan_every": 5},
                 {"grouped_matmul": "interpret"}, {"fp8_experts": True},
                 {"strategy": "dropless", "gates_before_down": True}],
}


def parameter_layout(spec: ModelSpec):
  """Every parameter's and balancing bias's path, shape and dtype, computing nothing (replica
  plans, with dispatch.expert_replicas, are routing state, not parameters)."""
  model = abstract_model(spec)
  _, params, biases, _ = nnx.split(model, nnx.Param, BalancingBias, ...)
  leaves = jax.tree_util.tree_leaves_with_path((params, biases))
  return {jax.tree_util.keystr(path): (leaf.shape, str(leaf.dtype)) for path, leaf in leaves}


def test_other_values_cover_every_field():
  assert set(OTHER) == set(ModelSpec.field_types())
  for section, changes in OTHER_SETTINGS.items():
    changed = {name for change in changes for name in change}
    assert changed == set(type(getattr(SMALL, section)).field_types()), section


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fields_outside_the_parameter_settings_leave_every_parameter_as_it_was(variant):
  spec = VARIANTS[variant]
  layout = parameter_layout(spec)
  for field in sorted(set(ModelSpec.field_types()) - set(PARAMETER_FIELDS)):
    assert parameter_layout(spec.replace(**{field: OTHER[field]})) == layout, field
  for section, changes in OTHER_SETTINGS.items():
    for change in changes:
      other = getattr(spec, section).replace(**change)
      assert parameter_layout(spec.replace(**{section: other})) == layout, (section, change)


def test_each_parameter_setting_changes_the_parameters_of_some_model():
  for field in PARAMETER_FIELDS:
    changes = [name for name, spec in VARIANTS.items()
               if parameter_layout(spec.replace(**{field: OTHER[field]})) != parameter_layout(spec)]
    assert changes, f"{field} changes no parameter of any variant: it need not be checked"


# ---- resuming after execution changes, on 8 simulated devices --------------------------------

CHANGES = {   # from capacity dispatch on a data-only mesh of 8, replicated experts, float32
    "data x expert mesh, all_to_all": {"dispatch.expert_parallel": "all_to_all", "mesh.data": 2,
                                       "mesh.expert": 4, "sharding.experts": "expert"},
    "dropless, and the checkpoint's list of blocks stacked (scanned layers)":
        {"dispatch.strategy": "dropless", "model.scan_layers": True},
    "bf16 and a new bias rate": {"model.compute_dtype": "bfloat16", "balancing.bias_update_rate": 0.05},
}


def _config(changes=None):
  from configs.default import get_config
  config = get_config("tiny,steps=11")
  config.dispatch.capacity_factor = 8.0   # room for every token: the dispatchers compute alike
  config.train.update(log_every=1, eval_every=100, checkpoint_every=10, sample_tokens=0)
  config.optimizer.warmup_steps = 2
  for key, value in (changes or {}).items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _state(workdir, step):
  from moe_jax.checkpoint import Checkpointer
  return Checkpointer(workdir / "checkpoints", 2).manager.restore(step)["state"]


def _by_layer(tree) -> dict:
  """{path: leaf} of a restored state, stacked blocks ("moe_blocks"/"dense_blocks", "layers",
  ...) written as the list's ("blocks", i, ...): states of either layout compare."""
  config = _config()
  firsts = {"dense_blocks": 0, "moe_blocks": config.model.num_dense_layers}
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    stack = next((i for i, k in enumerate(keys) if k in firsts), None)
    if stack is None:
      out[tuple(keys)] = leaf
      continue
    for j in range(leaf.shape[0]):
      out[(*keys[:stack], "blocks", str(firsts[keys[stack]] + j), *keys[stack + 2:])] = leaf[j]
  return out


def _losses(workdir):
  import json
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
          if "loss" in r}


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory):
  """A run stopped at step 10 (its checkpoint), and the same run continued to step 11."""
  import shutil
  from moe_jax.train import train_and_evaluate
  root = tmp_path_factory.mktemp("resume")
  train_and_evaluate(_config(), root / "ten", stop_after_step=10)
  shutil.copytree(root / "ten", root / "straight")
  train_and_evaluate(_config(), root / "straight")
  return root


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_run_resumes_after_an_execution_change(ten_steps, tmp_path, change):
  """Step, parameters, optimizer state, balancing biases and data position all continue: step
  11 after the change sees the batch and the state that step 11 without it saw."""
  import shutil
  import numpy as np
  from moe_jax.train import train_and_evaluate
  workdir = tmp_path / "changed"
  shutil.copytree(ten_steps / "ten", workdir)
  train_and_evaluate(_config(CHANGES[change]), workdir)
  losses, straight = _losses(workdir), _losses(ten_steps / "straight")
  assert sorted(losses) == list(range(1, 12))   # steps 1-10 kept, 11 trained once
  bf16 = "bf16" in change
  assert losses[11] == pytest.approx(straight[11], rel=2e-2 if bf16 else 1e-5)
  before, after, reference = (_state(ten_steps / "ten", 10), _state(workdir, 11),
                              _state(ten_steps / "straight", 11))
  assert int(after["step"]) == 11
  for name in ("params", "opt_state"):
    got, want = _by_layer(after[name]), _by_layer(reference[name])
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_allclose(np.asarray(got[path], np.float32),
                                 np.asarray(want[path], np.float32),
                                 rtol=2e-2 if bf16 else 1e-4, atol=1e-3 if bf16 else 1e-6,
                                 err_msg=str(path))
  rate = CHANGES[change].get("balancing.bias_update_rate", 0.01)
  biases = _by_layer(after["biases"])
  for path, b0 in _by_layer(before["biases"]).items():
    b1 = biases[path]
    steps_taken = np.abs(np.asarray(b1) - np.asarray(b0))   # the sign rule: 0 or the rate
    assert np.all(np.isclose(steps_taken, 0) | np.isclose(steps_taken, rate)), steps_taken
    assert np.isclose(steps_taken, rate).any()


def test_a_checkpoint_from_before_a_field_existed_resumes_and_a_shape_change_is_refused(
    ten_steps, tmp_path):
  """An older writer's config has the router, balancing and dispatch fields under `model`,
  and lacks fields added since: an execution field, and a parameter field whose default is
  this run's value. Both take their defaults; the resume goes on. A parameter field that
  differs is still refused, naming both values."""
  import json
  import shutil
  from moe_jax.checkpoint import CheckpointMismatch, json_checksum
  from moe_jax.train import train_and_evaluate
  workdir = tmp_path / "older"
  shutil.copytree(ten_steps / "ten", workdir)
  step_dir = workdir / "checkpoints" / "10"
  config = json.loads((step_dir / "config" / "metadata").read_text())
  old_names = {"score_function": "router", "strategy": "dispatcher"}
  for section in ("router", "balancing", "dispatch"):
    for field, value in config.pop(section).items():
      config["model"][old_names.get(field, field)] = value
  for field in ("expert_parallel_chunks", "shared_expert_gate"):
    del config["model"][field]
  integrity = json.loads((step_dir / "integrity" / "metadata").read_text())
  integrity["config"] = json_checksum(config)
  (step_dir / "config" / "metadata").write_text(json.dumps(config))
  (step_dir / "integrity" / "metadata").write_text(json.dumps(integrity))
  with pytest.raises(CheckpointMismatch, match="model.shared_expert_gate: False in the "
                                               "checkpoint, True now"):
    train_and_evaluate(_config({"model.shared_expert_gate": True}), workdir)
  with pytest.raises(CheckpointMismatch, match="dispatch.expert_replicas: 0 in the checkpoint, "
                                               "1 now"):
    train_and_evaluate(_config({"dispatch.strategy": "dropless", "mesh.data": 1, "mesh.expert": -1,
                                "dispatch.expert_parallel": "all_gather",
                                "dispatch.expert_replicas": 1}), workdir)
  train_and_evaluate(_config(), workdir)
  assert _losses(workdir)[11] == _losses(ten_steps / "straight")[11]
