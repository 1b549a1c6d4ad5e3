"""One early check of a whole config, so that a mistake is reported by name, before compiling.

`validate_config` raises `ConfigError` listing every problem found, each naming its field.
"""

import difflib
import math

from moe_jax import parallel
from moe_jax import tokenizer as tokenization
from moe_jax.dispatch import DISPATCHERS
from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT as EP_DISPATCHERS
from moe_jax.dispatch.expert_parallel import VARIANTS as EP_VARIANTS
from moe_jax.layers.attention import QK_NORMS
from moe_jax.layers.rope import SCALINGS
from moe_jax.model import ATTENTIONS, DTYPES, ModelSpec
from moe_jax.routing import BIAS_RULES, GROUP_SCORES, ROUTERS

# Every field the code reads, with its type: the contract of a config file. A field outside it
# is a typo or a setting that does nothing, so it is refused with the closest known name.
_MODEL_EXTRA = {"bias_update_rate": float, "bias_update_rule": str, "bias_freeze_step": int,
                "mtp_loss_weight": float, "mtp_loss_weight_final": float,
                "mtp_weight_switch_fraction": float}
FIELDS: dict[str, dict[str, type]] = {
    "data": {"source": str, "path": str, "tokenizer": str, "token_dtype": str,
             "validation_percent": int,
             "seq_len": int, "batch_size": int, "shuffle_seed": int},
    "model": {**ModelSpec.__annotations__, **_MODEL_EXTRA},
    "optimizer": {"learning_rate": float, "warmup_steps": int, "final_lr_fraction": float,
                  "b1": float, "b2": float, "weight_decay": float, "grad_clip_norm": float,
                  "shard_over_data": bool},
    "train": {"steps": int, "log_every": int, "eval_every": int, "eval_batches": int,
              "checkpoint_every": int, "checkpoints_to_keep": int, "sample_tokens": int,
              "sample_prompt": str, "metrics_port": int, "metrics_host": str,
              "peak_tflops": float, "spike_factor": float, "spike_window": int,
              "max_rollbacks": int},
    "mesh": {"data": int, "expert": int},
    "sharding": {name: str for name in parallel.LOGICAL_AXES},
}
TOP_LEVEL = {"seed": int}


class ConfigError(ValueError):
  """The config cannot run; the message names each offending field."""


def resolve_mesh_shape(data_size: int, expert_size: int, num_devices: int) -> tuple[int, int]:
  """Mesh (data, expert) sizes, a -1 taking the devices the other axis leaves."""
  sizes = [data_size, expert_size]
  if sizes.count(-1) > 1:
    raise ConfigError("mesh: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh: sizes must be positive or -1, got data={data_size}, expert={expert_size}")
  known = abs(data_size * expert_size) if -1 in sizes else data_size * expert_size
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices cannot be split with a fixed axis of {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if sizes[0] * sizes[1] != num_devices:
    raise ConfigError(f"mesh: data={sizes[0]} x expert={sizes[1]} = {sizes[0] * sizes[1]} devices, "
                      f"but {num_devices} are available")
  return sizes[0], sizes[1]


def _group_problems(m) -> list[str]:
  """Group-limited routing: groups divide the experts and leave room for top_k experts."""
  if m.group_score not in GROUP_SCORES:
    return [f"model.group_score={m.group_score!r} is unknown; choose from {list(GROUP_SCORES)}"]
  if m.num_groups < 1 or m.num_routed_experts % m.num_groups:
    return [f"model.num_groups={m.num_groups} must be >= 1 and divide "
            f"model.num_routed_experts={m.num_routed_experts}"]
  if not 1 <= m.topk_groups <= m.num_groups:
    return [f"model.topk_groups={m.topk_groups} must be between 1 and model.num_groups={m.num_groups}"]
  per_group = m.num_routed_experts // m.num_groups
  problems = []
  if m.num_groups > 1 and m.top_k > m.topk_groups * per_group:
    problems.append(f"model.top_k={m.top_k} is more than the {m.topk_groups * per_group} experts in "
                    f"model.topk_groups={m.topk_groups} groups of {per_group}")
  if m.num_groups > 1 and m.group_score == "top2_sum" and per_group < 2:
    problems.append(f"model.group_score='top2_sum' needs >= 2 experts per group; "
                    f"model.num_groups={m.num_groups} leaves {per_group}")
  if m.num_groups > 1 and m.router == "expert_choice":
    problems.append("model.num_groups > 1 is for token-choice routers, not 'expert_choice'")
  return problems


def _sharding_problems(config, mesh_sizes: dict[str, int]) -> list[str]:
  """Rules name known logical and mesh axes; the batch and the experts divide over theirs."""
  rules = parallel.parse_rules(config.sharding)
  problems = [f"sharding.{name}: unknown logical axis; known: {list(parallel.LOGICAL_AXES)}"
              for name in rules if name not in parallel.LOGICAL_AXES]
  problems += [f"sharding.{name}={','.join(axes)}: unknown mesh axis; mesh axes are "
               f"{list(parallel.MESH_AXES)}" for name, axes in rules.items()
               if any(a not in mesh_sizes for a in axes)]
  if problems:
    return problems
  for (param, _), names in parallel.PARAM_LOGICAL_AXES.items():
    used = [a for n in names for a in rules.get(n, ())]
    if len(used) != len(set(used)):
      problems.append(f"sharding: parameter '{param}' ({', '.join(names)}) would use a mesh axis "
                      f"twice: {used}")
  size = lambda name: math.prod(mesh_sizes[a] for a in rules.get(name, ()))
  d, m = config.data, config.model
  if d.batch_size % size("batch"):
    problems.append(f"data.batch_size={d.batch_size} does not divide over the {size('batch')} "
                    f"devices that split tokens (sharding.batch={config.sharding.batch!r}, mesh "
                    f"data={mesh_sizes['data']} x expert={mesh_sizes['expert']})")
  if m.num_routed_experts % size("experts"):
    problems.append(f"model.num_routed_experts={m.num_routed_experts} is not divisible by the "
                    f"{size('experts')} devices of sharding.experts={config.sharding.experts!r}")
  per_device = d.batch_size * d.seq_len // max(size("batch"), 1)
  if m.expert_parallel != "none" and m.expert_parallel_chunks >= 1 and (
      per_device % m.expert_parallel_chunks):
    problems.append(f"model.expert_parallel_chunks={m.expert_parallel_chunks} does not divide the "
                    f"{per_device} tokens of each device")
  if m.expert_parallel != "none" and (rules.get("experts") != ("expert",)
                                      or rules.get("batch") != parallel.BATCH_AXES):
    problems.append(f"model.expert_parallel={m.expert_parallel!r} needs sharding.experts='expert' "
                    f"and sharding.batch='data,expert'")
  return problems


def _type_name(kind: type) -> str:
  return {int: "an integer", float: "a number", bool: "True or False", str: "a string"}[kind]


def _has_type(value, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


INT_LIMIT = 2**31   # every integer setting is a size, count, step, seed or port: int32 holds it


def _value_problem(name: str, value, kind: type) -> str | None:
  """A value of the right type that no setting can use: NaN, infinity, or an integer past
  int32 (which the compiled program would wrap or refuse)."""
  if kind is float and not math.isfinite(value):
    return f"{name}={value!r} must be a finite number"
  if kind is int and not -INT_LIMIT < value < INT_LIMIT:
    return f"{name}={value!r} is out of range (|value| < 2^31)"
  return None


def _unknown(name: str, known) -> str:
  close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(known), n=1)
  prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
  hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
  return f"{name} is not a known field{hint}"


def _schema_problems(config) -> list[str]:
  """Sections and fields: none missing, none unknown, each of its type."""
  if not hasattr(config, "keys"):
    return [f"the config is a {type(config).__name__}, not an ml_collections.ConfigDict"]
  problems = []
  expected = {**{k: None for k in FIELDS}, **TOP_LEVEL}
  for key in config.keys():
    if key not in expected:
      problems.append(_unknown(key, expected))
  for name, kind in TOP_LEVEL.items():
    if name not in config:
      problems.append(f"{name}: missing")
    elif not _has_type(config[name], kind):
      problems.append(f"{name}={config[name]!r} must be {_type_name(kind)}")
    else:
      problems += filter(None, [_value_problem(name, config[name], kind)])
  for section, fields in FIELDS.items():
    if section not in config:
      problems.append(f"missing section '{section}'")
      continue
    values = config[section]
    if not hasattr(values, "keys"):
      problems.append(f"{section}={values!r} must be a section (a ConfigDict of fields)")
      continue
    problems += [_unknown(f"{section}.{k}", fields) for k in values.keys() if k not in fields]
    for name, kind in fields.items():
      if name not in values:
        problems.append(f"{section}.{name}: missing")
      elif not _has_type(values[name], kind):
        problems.append(f"{section}.{name}={values[name]!r} must be {_type_name(kind)}")
      else:
        problems += filter(None, [_value_problem(f"{section}.{name}", values[name], kind)])
  return problems


def _attention_problems(m) -> list[str]:
  """MLA's widths and YaRN's settings."""
  problems = []
  need = lambda ok, message: ok or problems.append(message)
  need(m.attention in ATTENTIONS,
       f"model.attention={m.attention!r} is unknown; choose from {list(ATTENTIONS)}")
  if m.attention == "mla":
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      need(m[name] >= 1, f"model.{name}={m[name]} must be >= 1 with model.attention='mla'")
    need(m.q_lora_rank >= 0, f"model.q_lora_rank={m.q_lora_rank} must be >= 0 (0: no query latent)")
    need(m.qk_rope_head_dim % 2 == 0,
         f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (rotary embeddings)")
  need(m.qk_norm in QK_NORMS, f"model.qk_norm={m.qk_norm!r} is unknown; choose from {list(QK_NORMS)}")
  need(m.rope_theta > 1, f"model.rope_theta={m.rope_theta} must be > 1")
  need(m.rope_scaling in SCALINGS,
       f"model.rope_scaling={m.rope_scaling!r} is unknown; choose from {list(SCALINGS)}")
  if m.rope_scaling == "yarn":
    need(m.rope_factor >= 1, f"model.rope_factor={m.rope_factor} must be >= 1 for YaRN")
    need(m.rope_original_max_len >= 1,
         f"model.rope_original_max_len={m.rope_original_max_len} must be >= 1")
    need(m.yarn_beta_fast > m.yarn_beta_slow > 0,
         f"model.yarn_beta_fast={m.yarn_beta_fast} must exceed model.yarn_beta_slow="
         f"{m.yarn_beta_slow} > 0")
  return problems


def _problems(config, num_devices: int, backend: str) -> list[str]:
  problems = _schema_problems(config)
  if problems:   # the value checks below assume every field is there with its type
    return problems
  need = lambda ok, message: ok or problems.append(message)
  m, d, o, t = config.model, config.data, config.optimizer, config.train

  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "dense_mlp_dim", "num_routed_experts", "expert_dim", "top_k"):
    need(m[name] >= 1, f"model.{name}={m[name]} must be >= 1")
  need(0 <= m.num_dense_layers <= m.num_layers,
       f"model.num_dense_layers={m.num_dense_layers} must be between 0 and "
       f"model.num_layers={m.num_layers}")
  need(m.num_shared_experts >= 0, f"model.num_shared_experts={m.num_shared_experts} must be >= 0")
  need(m.top_k <= m.num_routed_experts,
       f"model.top_k={m.top_k} is larger than model.num_routed_experts={m.num_routed_experts}")
  need(m.num_kv_heads >= 1 and m.num_heads % max(m.num_kv_heads, 1) == 0,
       f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
  need(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even (rotary embeddings)")
  problems.extend(_attention_problems(m))
  need(m.mtp_depth >= 0, f"model.mtp_depth={m.mtp_depth} must be >= 0 (0: no multi-token prediction)")
  need(m.mtp_depth < config.data.seq_len,
       f"model.mtp_depth={m.mtp_depth} must be below data.seq_len={config.data.seq_len}")
  for name in ("mtp_loss_weight", "mtp_loss_weight_final"):
    need(m[name] >= 0, f"model.{name}={m[name]} must be >= 0")
  need(0 <= m.mtp_weight_switch_fraction <= 1,
       f"model.mtp_weight_switch_fraction={m.mtp_weight_switch_fraction} must be in [0, 1]")
  need(m.router in ROUTERS, f"model.router={m.router!r} is unknown; choose from {sorted(ROUTERS)}")
  need(m.dispatcher in DISPATCHERS,
       f"model.dispatcher={m.dispatcher!r} is unknown; choose from {sorted(DISPATCHERS)}")
  need(m.compute_dtype in DTYPES,
       f"model.compute_dtype={m.compute_dtype!r} is unknown; choose from {sorted(DTYPES)}")
  need(m.capacity_factor > 0, f"model.capacity_factor={m.capacity_factor} must be > 0")
  need(m.expert_parallel_chunks >= 1,
       f"model.expert_parallel_chunks={m.expert_parallel_chunks} must be >= 1")
  need(m.route_scale > 0, f"model.route_scale={m.route_scale} must be > 0")
  need(m.bias_update_rate >= 0, f"model.bias_update_rate={m.bias_update_rate} must be >= 0")
  for name in ("switch_loss_alpha", "sequence_loss_alpha", "z_loss_coef"):
    need(m[name] >= 0, f"model.{name}={m[name]} must be >= 0")
  need(m.bias_update_rule in BIAS_RULES,
       f"model.bias_update_rule={m.bias_update_rule!r} is unknown; choose from {list(BIAS_RULES)}")
  need(m.bias_freeze_step >= -1, f"model.bias_freeze_step={m.bias_freeze_step} must be -1 (never) or >= 0")
  problems.extend(_group_problems(m))
  need(m.expert_parallel in ("none",) + EP_VARIANTS,
       f"model.expert_parallel={m.expert_parallel!r} is unknown; choose from "
       f"{['none', *EP_VARIANTS]}")
  if m.expert_parallel == "ragged_all_to_all" and backend == "cpu":
    problems.append("model.expert_parallel='ragged_all_to_all' needs a GPU or TPU backend: the "
                    "cpu backend has no ragged_all_to_all; use 'all_to_all' or 'all_gather'")
  implied = EP_DISPATCHERS.get(m.expert_parallel)
  if implied and m.dispatcher != implied:
    problems.append(f"model.expert_parallel={m.expert_parallel!r} dispatches as {implied!r} does, "
                    f"but model.dispatcher={m.dispatcher!r}: set model.dispatcher={implied!r} "
                    f"(all_to_all is capacity dispatch; all_gather and ragged_all_to_all are "
                    f"dropless)")
  if m.expert_parallel != "none" and m.router == "expert_choice":
    problems.append("model.expert_parallel is for token-choice routers, not 'expert_choice'")
  if m.router == "expert_choice":
    for name in ("bias_update_rate", "switch_loss_alpha", "sequence_loss_alpha"):
      need(m[name] == 0, f"model.{name}={m[name]} has no effect with model.router='expert_choice' "
                         f"(balanced by construction): set it to 0")
  need(d.tokenizer in tokenization.KINDS,
       f"data.tokenizer={d.tokenizer!r} is unknown; choose from {list(tokenization.KINDS)}")
  if d.source in ("stdlib", "text"):
    need(m.vocab_size >= tokenization.MIN_VOCAB,
         f"model.vocab_size={m.vocab_size} is too small for data.tokenizer={d.tokenizer!r}: "
         f"needs >= {tokenization.MIN_VOCAB} (256 bytes + pad + bos)")
  need(d.source != "tokens" or d.tokenizer == "bytes",
       f"data.tokenizer={d.tokenizer!r} does nothing with data.source='tokens' (the file holds "
       f"token ids already): leave data.tokenizer at 'bytes'")

  need(d.source in ("stdlib", "text", "tokens"),
       f"data.source={d.source!r} is unknown; choose from ['stdlib', 'text', 'tokens']")
  need(d.source == "stdlib" or bool(d.path), f"data.path is required when data.source={d.source!r}")
  need(d.token_dtype in ("uint16", "uint32"), f"data.token_dtype={d.token_dtype!r}: uint16 or uint32")
  need(0 < d.validation_percent < 100,
       f"data.validation_percent={d.validation_percent} must be between 1 and 99")
  need(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
  need(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
  need(d.shuffle_seed >= 0, f"data.shuffle_seed={d.shuffle_seed} must be >= 0")
  need(config.seed >= 0, f"seed={config.seed} must be >= 0")

  need(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be > 0")
  need(0 <= o.warmup_steps < t.steps,
       f"optimizer.warmup_steps={o.warmup_steps} must be >= 0 and below train.steps={t.steps}")
  need(0 <= o.final_lr_fraction <= 1,
       f"optimizer.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1)")
  need(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
  need(o.grad_clip_norm > 0, f"optimizer.grad_clip_norm={o.grad_clip_norm} must be > 0")

  need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
  for name in ("log_every", "eval_every", "checkpoint_every", "checkpoints_to_keep"):
    need(t[name] >= 1, f"train.{name}={t[name]} must be >= 1")
  need(t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} must be >= 0 (0: the whole "
       f"validation split)")
  need(t.sample_tokens >= 0, f"train.sample_tokens={t.sample_tokens} must be >= 0")
  need(0 <= t.metrics_port <= 65535, f"train.metrics_port={t.metrics_port} must be 0 (off) or a port")
  need(bool(t.metrics_host.strip()), "train.metrics_host is empty: give an address to serve the "
       "live metrics on (127.0.0.1, or 0.0.0.0 for every interface)")
  need(t.peak_tflops >= 0, f"train.peak_tflops={t.peak_tflops} must be >= 0 (0: look the device up)")
  need(t.spike_factor == 0 or t.spike_factor > 1,
       f"train.spike_factor={t.spike_factor} must be 0 (off) or above 1 (a multiple of the mean loss)")
  need(t.spike_window >= 1, f"train.spike_window={t.spike_window} must be >= 1")
  need(t.max_rollbacks >= 0, f"train.max_rollbacks={t.max_rollbacks} must be >= 0")

  try:
    data_size, expert_size = resolve_mesh_shape(config.mesh.data, config.mesh.expert, num_devices)
  except ConfigError as e:
    problems.append(str(e))
  else:
    problems.extend(_sharding_problems(config, {"data": data_size, "expert": expert_size}))
  return problems


def validate_config(config, num_devices: int, backend: str | None = None) -> None:
  """Raises ConfigError naming every field that makes `config` impossible to run.

  `backend` ("cpu", "gpu", "tpu") defaults to jax's default backend.
  """
  if backend is None:
    import jax
    backend = jax.default_backend()
  problems = _problems(config, num_devices, backend)
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
