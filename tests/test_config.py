"""Config validation: every impossible setting is reported by field name, before compiling."""

import re

import pytest

from configs.default import get_config
from moe_jax.config_validation import ConfigError, resolve_mesh_shape, validate_config


@pytest.mark.parametrize("arg", ["", "tiny", "tiny,steps=7,batch=16,seq=32", "gpu"])
def test_shipped_configs_are_valid(arg):
  validate_config(get_config(arg), num_devices=8)


def test_config_argument_shorthands():
  c = get_config("tiny,steps=7,batch=16,seq=32")
  assert (c.train.steps, c.data.batch_size, c.data.seq_len) == (7, 16, 32)
  with pytest.raises(ValueError, match="bad argument 'layers=3'"):
    get_config("tiny,layers=3")


BAD = [
    ("train.microbatches", 0, "train.microbatches=0 must be >= 1"),
    ("train.microbatches", 3, "data.batch_size=8 does not split into train.microbatches=3 "
                              "slices that each divide over the 8 device(s)"),
    ("router.top_k", 9, "router.top_k=9 is larger than model.num_routed_experts=8"),
    ("router.score_function", "bogus", "router.score_function='bogus' is unknown"),
    ("dispatch.strategy", "magic", "dispatch.strategy='magic' is unknown"),
    ("model.num_kv_heads", 3, "model.num_heads=2 is not a multiple of model.num_kv_heads=3"),
    ("model.num_dense_layers", 5, "model.num_dense_layers=5 must be between 0 and"),
    ("model.vocab_size", 100, "model.vocab_size=100 is too small for data.tokenizer='bytes'"),
    ("data.tokenizer", "wordpiece", "data.tokenizer='wordpiece' is unknown"),
    ("model.compute_dtype", "float16", "model.compute_dtype='float16' is unknown"),
    ("data.batch_size", 12, "data.batch_size=12 does not divide over the 8 devices"),
    ("data.source", "web", "data.source='web' is unknown"),
    ("mesh.expert", 3, "mesh: 8 devices cannot be split with fixed axes of 3"),
    ("mesh.data", 3, "mesh: data=3 x fsdp=1 x tensor=1 x expert=1 x stage=1 = 3 devices, but 8 are available"),
    ("optimizer.warmup_steps", 100, "optimizer.warmup_steps=100 must be >= 0 and below"),
    ("optimizer.moment_dtype", "float16",
     "optimizer.moment_dtype='float16' is unknown; choose from ['bfloat16', 'float32']"),
    ("router.num_groups", 3, "router.num_groups=3 must divide model.num_routed_experts=8"),
    ("router.topk_groups", 2, "router.topk_groups=2 must be between 1 and router.num_groups=1"),
    ("router.group_score", "mean", "router.group_score='mean' is unknown"),
    ("balancing.bias_update_rule", "pid", "balancing.bias_update_rule='pid' is unknown"),
    ("balancing.z_loss_coef", -1.0, "balancing.z_loss_coef=-1.0 must be >= 0"),
    ("train.metrics_port", 70000, "train.metrics_port=70000 must be 0 (off) or a port"),
    ("dispatch.expert_parallel", "magic", "dispatch.expert_parallel='magic' is unknown"),
    ("dispatch.expert_parallel_chunks", 0, "dispatch.expert_parallel_chunks=0 must be >= 1"),
    ("dispatch.ragged_capacity_factor", -1.0, "dispatch.ragged_capacity_factor=-1.0 must be >= 0"),
    ("dispatch.ragged_capacity_factor", 1.5, "dispatch.ragged_capacity_factor=1.5 caps the "
     "'ragged_all_to_all' variant's exchange, but dispatch.expert_parallel='none'"),
    ("dispatch.expert_replicas", -1, "dispatch.expert_replicas=-1 must be >= 0"),
    ("dispatch.replica_replan_every", 0, "dispatch.replica_replan_every=0 must be >= 1"),
    ("dispatch.gates_before_down", True,
     "dispatch.gates_before_down=True is for dispatch.strategy='dropless' on one device group, "
     "but dispatch.strategy='capacity'"),
    ("sharding.embed", "pipe", "sharding.embed=pipe: unknown mesh axis"),
    ("sharding.embed", "stage", "sharding.embed=stage: the stage axis holds pipeline stages"),
    ("pipeline.schedule", "zb", "pipeline.schedule='zb' is unknown"),
    ("dispatch.expert_parallel", "ragged_all_to_all",
     "dispatch.expert_parallel='ragged_all_to_all' needs a GPU or TPU backend"),
    ("model.attention_implementation", "cudnn",
     "model.attention_implementation='cudnn' needs an NVIDIA GPU, but the backend is cpu"),
    ("model.attention", "flash", "model.attention='flash' is unknown; choose from ['gqa', 'mla']"),
    ("model.rope_scaling", "ntk", "model.rope_scaling='ntk' is unknown"),
    ("mesh.dcn_data", 3, "mesh.dcn_data=3 does not divide mesh.data=8"),
    ("mesh.dcn_data", 2, "mesh.dcn_*: data=2 x fsdp=1 x tensor=1 x expert=1 x stage=1 = 2 granules, but "
                         "the run has 1 (TPU slices, else processes)"),
    ("mesh.dcn_fsdp", 0, "mesh.dcn_fsdp=0 must be >= 1"),
]


MLA_BAD = [
    ({"qk_rope_head_dim": 7}, "model.qk_rope_head_dim=7 must be even"),
    ({"kv_lora_rank": 0}, "model.kv_lora_rank=0 must be >= 1 with model.attention='mla'"),
    ({"q_lora_rank": -1}, "model.q_lora_rank=-1 must be >= 0"),
    ({"rope_scaling": "yarn", "rope_factor": 0.5}, "model.rope_factor=0.5 must be >= 1 for YaRN"),
    ({"rope_scaling": "yarn", "yarn_beta_slow": 40.0},
     "model.yarn_beta_fast=32.0 must exceed model.yarn_beta_slow=40.0 > 0"),
]


@pytest.mark.parametrize("changes, message", MLA_BAD, ids=[m[1][:30] for m in MLA_BAD])
def test_bad_latent_attention_and_yarn_settings_are_named(changes, message):
  config = get_config("tiny")
  config.model.attention = "mla"
  config.model.update(changes)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config, num_devices=8)


@pytest.mark.parametrize("field, value, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_named(field, value, message):
  config = get_config("tiny")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config, num_devices=8)


def test_a_rule_that_puts_a_mesh_axis_twice_on_a_parameter_is_refused_before_compiling():
  from moe_jax.train import laid_out_state, mesh_of
  config = get_config("tiny")
  config.sharding.mlp = "expert"   # w_gate: experts and mlp both over `expert`
  config.mesh.data, config.mesh.expert = 2, 4
  validate_config(config, num_devices=8)
  with pytest.raises(ConfigError, match=r"sharding: parameter blocks\.1\.mlp\.w_(gate|up|down) "
                     r"\(experts, .*mlp.*\) would use a mesh axis twice: \['expert', 'expert'\]"):
    laid_out_state(config, mesh_of(config))


def test_group_limits_leave_room_for_top_k():
  config = get_config("tiny")
  config.router.num_groups, config.router.topk_groups, config.router.top_k = 4, 1, 3
  with pytest.raises(ConfigError, match="router.top_k=3 is more than the 2 experts in "
                                        "router.topk_groups=1 groups of 2"):
    validate_config(config, num_devices=8)


def test_expert_choice_rejects_balancing_that_does_nothing():
  config = get_config("tiny")
  config.router.score_function = "expert_choice"
  with pytest.raises(ConfigError, match="balancing.bias_update_rate=0.01 has no effect with "
                                        "router.score_function='expert_choice'"):
    validate_config(config, num_devices=8)


def test_experts_must_divide_over_expert_axis():
  config = get_config("tiny")
  config.model.num_routed_experts = 6
  config.mesh.expert, config.mesh.data = 4, 2
  with pytest.raises(ConfigError, match=re.escape(
      "model.num_routed_experts=6 is not divisible by the 4 devices of sharding.experts='expert'")):
    validate_config(config, num_devices=8)


def test_all_problems_are_listed_at_once():
  config = get_config("tiny")
  config.router.top_k, config.router.score_function = 99, "nope"
  with pytest.raises(ConfigError) as error:
    validate_config(config, num_devices=8)
  assert "router.top_k" in str(error.value) and "router.score_function" in str(error.value)


def test_mesh_shape_resolution():
  # data, fsdp, tensor, expert, stage
  sizes = lambda **axes: tuple(resolve_mesh_shape(axes, 8).values())
  assert sizes(data=-1, expert=1) == (8, 1, 1, 1, 1)
  assert sizes(data=2, expert=-1) == (2, 1, 1, 4, 1)
  assert sizes(data=4, expert=2) == (4, 1, 1, 2, 1)
  assert sizes(data=2, fsdp=-1, tensor=2) == (2, 2, 2, 1, 1)
  assert sizes(data=-1, stage=4) == (2, 1, 1, 1, 4)
  with pytest.raises(ConfigError, match="at most one axis"):
    resolve_mesh_shape({"data": -1, "expert": -1}, 8)
  with pytest.raises(ConfigError, match="8 devices cannot be split with fixed axes of 3"):
    resolve_mesh_shape({"data": -1, "tensor": 3}, 8)


def test_expert_parallel_chunks_divide_each_devices_tokens():
  config = get_config("tiny,ep=all_to_all")        # 8 x 64 tokens over 8 devices: 64 each
  config.dispatch.expert_parallel_chunks = 4
  validate_config(config, num_devices=8)
  config.dispatch.expert_parallel_chunks = 3
  with pytest.raises(ConfigError, match="expert_parallel_chunks=3 does not divide the 64 tokens"):
    validate_config(config, num_devices=8)


def test_expert_parallelism_needs_the_expert_rules():
  config = get_config("tiny,ep=all_to_all")
  validate_config(config, num_devices=8)
  config.sharding.experts = ""
  with pytest.raises(ConfigError, match="needs sharding.experts='expert'"):
    validate_config(config, num_devices=8)


@pytest.mark.parametrize("variant, dispatcher", [("all_to_all", "dense"),
                                                 ("all_to_all", "dropless"),
                                                 ("all_gather", "capacity"),
                                                 ("all_gather", "reference")])
def test_an_expert_parallel_variant_and_a_dispatcher_it_does_not_run_are_refused(variant,
                                                                                  dispatcher):
  config = get_config(f"tiny,ep={variant}")      # the shorthand picks the variant's dispatcher
  validate_config(config, num_devices=8)
  config.dispatch.strategy = dispatcher
  with pytest.raises(ConfigError, match=f"dispatch.expert_parallel='{variant}' dispatches as .* but "
                                        f"dispatch.strategy='{dispatcher}'"):
    validate_config(config, num_devices=8)


def test_sharding_rules_that_do_not_fit_a_parameter_are_refused(tmp_path):
  from moe_jax.train import train_and_evaluate
  config = get_config("tiny")
  config.sharding.vocab, config.mesh.data, config.mesh.expert = "data", 8, 1   # 260 % 8 != 0
  with pytest.raises(ConfigError, match="has 260 along 'vocab', not divisible by 8 devices"):
    train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_config_saved_before_the_router_balancing_and_dispatch_sections_reads_as_today():
  """A run's config.json from before the sections existed (those fields under `model`, some
  fields missing) reads back with every value in its new place and defaults for the rest."""
  import ml_collections
  from moe_jax.config_validation import upgrade_saved_config
  from moe_jax.model import ModelSpec
  saved = get_config("tiny").to_dict()
  for section in ("router", "balancing", "dispatch"):
    del saved[section]
  saved["model"].update(router="softmax", top_k=3, dispatcher="dropless", capacity_factor=2.0,
                        bias_update_rate=0.05, sequence_loss_alpha=0.0)
  upgraded = upgrade_saved_config(saved)
  spec = ModelSpec.from_config(ml_collections.ConfigDict(upgraded))
  assert (spec.router.score_function, spec.router.top_k) == ("softmax", 3)
  assert (spec.dispatch.strategy, spec.dispatch.capacity_factor) == ("dropless", 2.0)
  assert (spec.balancing.bias_update_rate, spec.balancing.z_loss_coef) == (0.05, 0.0)
  assert spec.dispatch.expert_parallel_chunks == 1 and spec.router.num_groups == 1   # defaults
  assert "top_k" not in upgraded["model"] and "dispatcher" not in upgraded["model"]


def test_every_moved_field_names_a_field_of_its_new_section_and_every_balancing_setting():
  """moved_fields.MOVED is written out (the command line reads it without importing the
  settings classes): each new name must be a field today, and every balancing setting, all
  of which were model fields once, must have its old name."""
  from moe_jax.config_validation import FIELDS
  from moe_jax.moved_fields import MOVED
  from moe_jax.routing import BalancingSettings
  for old, new in MOVED.items():
    section, field = new.split(".")
    assert old.startswith("model.") and field in FIELDS[section], (old, new)
  assert {f"model.{name}" for name in BalancingSettings.field_types()} <= set(MOVED)


def test_a_mesh_without_the_fsdp_tensor_and_stage_axes_has_them_at_1():
  """A config written before those axes (and the pipeline section) existed still validates
  and gets the same mesh."""
  config = get_config("tiny")
  del config.mesh["fsdp"], config.mesh["tensor"], config.mesh["stage"], config["pipeline"]
  validate_config(config, num_devices=8)
  assert resolve_mesh_shape(dict(config.mesh), 8) == {"data": 8, "fsdp": 1, "tensor": 1,
                                                     "expert": 1, "stage": 1}


def test_a_pipeline_on_a_gpu_takes_cudnn_attention_only_where_the_batch_splits_over_every_axis():
  """Inside a pipeline cuDNN's fused attention runs with each device on its own shard of the
  batch (its custom partitioner fails under a partly manual shard_map): accepted with
  mesh.tensor 1, refused by name before compiling with mesh.tensor 2 (which the batch does not
  split over), accepted there with the XLA path."""
  config = get_config("tiny")
  config.mesh.update(stage=2, data=4)
  config.model.update(scan_layers=True, num_layers=5, compute_dtype="bfloat16")
  validate_config(config, num_devices=8, backend="gpu")
  config.mesh.update(data=2, tensor=2)
  with pytest.raises(ConfigError, match=re.escape(
      "model.attention_implementation='auto' takes cuDNN's fused attention here, which runs "
      "inside a pipeline (mesh.stage=2) with each device on its own shard of the batch, which "
      "mesh.tensor=2 does not split")):
    validate_config(config, num_devices=8, backend="gpu")
  config.model.attention_implementation = "xla"
  validate_config(config, num_devices=8, backend="gpu")
  config.model.attention_implementation = "auto"
  validate_config(config, num_devices=8, backend="cpu")


def test_expert_parallelism_in_a_pipeline_reads_the_resolved_tensor_axis():
  """mesh.tensor=-1 takes the devices left over: refused where that is 2, accepted where it is
  1, and the refusal names the resolved size."""
  config = get_config("tiny,batch=16")
  config.mesh.update(stage=2, data=1, expert=2, tensor=-1)
  config.model.update(scan_layers=True, num_layers=5)
  config.dispatch.expert_parallel, config.train.microbatches = "all_to_all", 4
  validate_config(config, num_devices=4)
  with pytest.raises(ConfigError, match=re.escape("which mesh.tensor=2 does not split")):
    validate_config(config, num_devices=8)
