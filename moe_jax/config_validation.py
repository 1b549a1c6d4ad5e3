"""One early check of a whole config, so that a mistake is reported by name, before compiling.

`validate_config` raises `ConfigError` listing every problem found, each naming its field.
The schema is the settings dataclasses' fields (plus `mesh` and `sharding`, whose checks need
the devices); each section's own values are checked by its dataclass; what is checked here
spans sections (the context against MTP depth, the vocabulary against the tokenizer, warmup
against the steps, the mesh and sharding rules against batch and experts, the backend).
"""

import difflib
import math

from moe_jax import parallel
from moe_jax import tokenizer as tokenization
from moe_jax.data import DataSettings
from moe_jax.dispatch import DispatchSettings
from moe_jax.model import ModelSpec
from moe_jax.moved_fields import MOVED
from moe_jax.pipeline.settings import PipelineSettings
from moe_jax.routing import BalancingSettings, RouterSettings
from moe_jax.settings import ConfigError, Settings, value_problem
from moe_jax.steps import OptimizerSettings
from moe_jax.train_settings import TrainSettings

# The sections read into settings objects, each checking its own fields: their fields and
# types are the dataclasses'. The checks here are those that span sections.
SETTINGS_SECTIONS: dict[str, type[Settings]] = {
    "data": DataSettings, "model": ModelSpec, "router": RouterSettings,
    "balancing": BalancingSettings, "dispatch": DispatchSettings,
    "optimizer": OptimizerSettings, "train": TrainSettings, "pipeline": PipelineSettings}
MODEL_SECTIONS = ("model", "router", "balancing", "dispatch")
# Every field the code reads, with its type: the contract of a config file. A field outside it
# is a typo or a setting that does nothing, so it is refused with the closest known name.
FIELDS: dict[str, dict[str, type]] = {
    **{name: kind.field_types() for name, kind in SETTINGS_SECTIONS.items()},
    "mesh": {axis: int for axis in parallel.MESH_AXES + parallel.DCN_AXES},
    "sharding": {name: str for name in parallel.LOGICAL_AXES},
}
TOP_LEVEL = {"seed": int}
# Sections a config may leave out (those from before they existed): their defaults apply.
OPTIONAL_SECTIONS = ("pipeline",)


def upgrade_saved_config(saved: dict) -> dict:
  """A config saved by a run (config.json) in today's sections: fields written under their
  old names move to their new ones; fields it lacks take their defaults when read."""
  upgraded = {name: dict(value) if isinstance(value, dict) else value
              for name, value in saved.items()}
  for old, new in MOVED.items():
    old_section, old_field = old.split(".")
    new_section, new_field = new.split(".")
    if old_field in upgraded.get(old_section, {}):
      value = upgraded[old_section].pop(old_field)
      upgraded.setdefault(new_section, {}).setdefault(new_field, value)
  for section in MODEL_SECTIONS:
    kind = SETTINGS_SECTIONS[section]
    values = {**kind.field_defaults(), **upgraded.get(section, {})}
    upgraded[section] = {k: v for k, v in values.items() if k in kind.field_types()}
  return upgraded


def _mesh_text(sizes: dict[str, int]) -> str:
  return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


def resolve_mesh_shape(requested: dict[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes (every axis of parallel.MESH_AXES; an absent one is 1), a -1 taking the
  devices the other axes leave."""
  sizes = {axis: int(requested.get(axis, 1)) for axis in parallel.MESH_AXES}
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError("mesh: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"mesh: sizes must be positive or -1, got {_mesh_text(sizes)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices cannot be split with fixed axes of {known}")
    sizes[next(a for a, s in sizes.items() if s == -1)] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh: {_mesh_text(sizes)} = {math.prod(sizes.values())} devices, but "
                      f"{num_devices} are available")
  return sizes


def dcn_sizes(config) -> dict[str, int]:
  """{mesh axis: granules (slices or hosts) it spans} from `mesh.dcn_<axis>` (absent: 1)."""
  return {axis: int(config.mesh.get(f"dcn_{axis}", 1)) for axis in parallel.MESH_AXES}


def _dcn_problems(dcn: dict[str, int], mesh_sizes: dict[str, int], granules: int) -> list[str]:
  """A hybrid mesh: each axis spans a whole number of granules, and they are all there."""
  problems = [f"mesh.dcn_{a}={n} must be >= 1" for a, n in dcn.items() if n < 1]
  if problems:
    return problems
  problems = [f"mesh.dcn_{a}={n} does not divide mesh.{a}={mesh_sizes[a]} (each of the {n} "
              f"granules must hold the same number of the axis's devices)"
              for a, n in dcn.items() if mesh_sizes[a] % n]
  if math.prod(dcn.values()) > 1 and math.prod(dcn.values()) != granules:
    problems.append(f"mesh.dcn_*: {_mesh_text(dcn)} = {math.prod(dcn.values())} granules, but "
                    f"the run has {granules} (TPU slices, else processes)")
  return problems


def _sharding_problems(config, spec: ModelSpec, mesh_sizes: dict[str, int]) -> list[str]:
  """Rules name known logical and mesh axes; the batch and the experts divide over theirs."""
  rules = parallel.parse_rules(config.sharding)
  problems = [f"sharding.{name}: unknown logical axis; known: {list(parallel.LOGICAL_AXES)}"
              for name in rules if name not in parallel.LOGICAL_AXES]
  problems += [f"sharding.{name}={','.join(axes)}: unknown mesh axis; mesh axes are "
               f"{list(parallel.MESH_AXES)}" for name, axes in rules.items()
               if any(a not in mesh_sizes for a in axes)]
  problems += [f"sharding.{name}={','.join(axes)}: the stage axis holds pipeline stages (the "
               f"MoE blocks, split by mesh.stage), not a dimension a rule splits"
               for name, axes in rules.items() if "stage" in axes]
  if problems:
    return problems
  size = lambda name: math.prod(mesh_sizes[a] for a in rules.get(name, ()))
  d, ep = config.data, spec.dispatch
  microbatches = config.train.microbatches
  if d.batch_size % size("batch"):
    problems.append(f"data.batch_size={d.batch_size} does not divide over the {size('batch')} "
                    f"devices that split tokens (sharding.batch={config.sharding.batch!r}, mesh "
                    f"{_mesh_text(mesh_sizes)})")
  elif microbatches >= 1 and d.batch_size % (microbatches * size("batch")):
    problems.append(f"data.batch_size={d.batch_size} does not split into train.microbatches="
                    f"{microbatches} slices that each divide over the {size('batch')} "
                    f"device(s) that split tokens")
  if spec.num_routed_experts % size("experts"):
    problems.append(f"model.num_routed_experts={spec.num_routed_experts} is not divisible by the "
                    f"{size('experts')} devices of sharding.experts={config.sharding.experts!r}")
  per_device = d.batch_size // max(microbatches, 1) * d.seq_len // max(size("batch"), 1)
  if ep.expert_parallel != "none" and per_device % ep.expert_parallel_chunks:
    problems.append(f"dispatch.expert_parallel_chunks={ep.expert_parallel_chunks} does not divide "
                    f"the {per_device} tokens of each device")
  if ep.expert_parallel != "none" and (rules.get("experts") != ("expert",)
                                       or rules.get("batch") != parallel.BATCH_AXES):
    problems.append(f"dispatch.expert_parallel={ep.expert_parallel!r} needs "
                    f"sharding.experts='expert' and sharding.batch="
                    f"{','.join(parallel.BATCH_AXES)!r}")
  return problems


def pipeline_settings(config) -> PipelineSettings:
  """The `pipeline` section of a validated config (its defaults where the config has none)."""
  return PipelineSettings.from_section(config.get("pipeline", {}))


def _pipeline_problems(config, spec: ModelSpec, mesh_sizes: dict[str, int],
                       backend: str) -> list[str]:
  """What a pipeline over the mesh's `stage` devices cannot run (moe_jax/pipeline/training.py);
  `mesh_sizes` resolved (no -1)."""
  stage_devices = mesh_sizes["stage"]
  if stage_devices == 1 or _section_problems(config, "pipeline"):
    return []
  settings = pipeline_settings(config)
  stages, schedule = settings.stages(stage_devices), settings.schedule
  problems = []
  need = lambda ok, message: ok or problems.append(message)
  need(spec.scan_layers, f"mesh.stage={stage_devices} splits the stack of MoE blocks into "
       f"pipeline stages: set model.scan_layers=True")
  moe_blocks = spec.num_layers - spec.num_dense_layers
  blocks = (f"model.num_layers={spec.num_layers} with model.num_dense_layers="
            f"{spec.num_dense_layers} leaves {moe_blocks} MoE blocks")
  if settings.stage_blocks.strip():
    counts = settings.block_counts(stages, moe_blocks)
    need(len(counts) == stages and sum(counts) == moe_blocks,
         f"pipeline.stage_blocks={settings.stage_blocks!r} gives {len(counts)} stages "
         f"{sum(counts)} MoE blocks, but {blocks} in the {stages} stages of "
         f"pipeline.schedule={schedule!r} on mesh.stage={stage_devices}")
  else:
    need(moe_blocks >= stages and moe_blocks % stages == 0,
         f"{blocks}, which do not split evenly into the {stages} stages of "
         f"pipeline.schedule={schedule!r} on mesh.stage={stage_devices} (pipeline.stage_blocks "
         f"sets an uneven split)")
  fewest = settings.min_microbatches(stage_devices)
  need(config.train.microbatches >= fewest,
       f"train.microbatches={config.train.microbatches} (the pipeline's micro-batches) is below "
       f"the {fewest} that pipeline.schedule={schedule!r} needs on mesh.stage={stage_devices}")
  tensor = mesh_sizes["tensor"]
  need(spec.attention_path(backend) != "cudnn" or tensor == 1,
       f"model.attention_implementation={spec.attention_implementation!r} takes cuDNN's fused "
       f"attention here, which runs inside a pipeline (mesh.stage={stage_devices}) with each "
       f"device on its own shard of the batch, which mesh.tensor={tensor} does not split: set "
       f"mesh.tensor=1 or model.attention_implementation='xla'")
  need(not (spec.dispatch.strategy == "dropless" and spec.dispatch.grouped_matmul == "interpret"),
       f"dispatch.grouped_matmul='interpret' (the GPU kernels in Pallas interpret mode) does not "
       f"run inside a pipeline (mesh.stage={stage_devices}): use 'auto'")
  if spec.dispatch.expert_parallel != "none":   # every mesh axis manual inside the pipeline
    need(tensor == 1, f"dispatch.expert_parallel={spec.dispatch.expert_parallel!r} inside a "
         f"pipeline (mesh.stage={stage_devices}) runs each device on its own shard of the batch, "
         f"which mesh.tensor={tensor} does not split: set mesh.tensor=1")
    need(not spec.dispatch.expert_replicas, f"dispatch.expert_replicas="
         f"{spec.dispatch.expert_replicas} does not run inside a pipeline yet "
         f"(mesh.stage={stage_devices}): set it to 0")
  return problems


def _unknown(name: str, known) -> str:
  if name in MOVED:
    return f"{name} is now {MOVED[name]}"
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
    else:
      problems += filter(None, [value_problem(name, config[name], kind)])
  for section, fields in FIELDS.items():
    if section not in config and section in OPTIONAL_SECTIONS:
      continue
    if section not in config:
      problems.append(f"missing section '{section}'")
      continue
    values = config[section]
    if not hasattr(values, "keys"):
      problems.append(f"{section}={values!r} must be a section (a ConfigDict of fields)")
      continue
    problems += [_unknown(f"{section}.{k}", fields) for k in values.keys() if k not in fields]
    for name, kind in fields.items():
      if name not in values and section == "mesh":
        continue   # an axis a config does not name has size 1 (configs from before fsdp, tensor)
      if name not in values:
        problems.append(f"{section}.{name}: missing")
      else:
        problems += filter(None, [value_problem(f"{section}.{name}", values[name], kind)])
  return problems


def model_spec(config) -> tuple[ModelSpec | None, list[str]]:
  """(the ModelSpec of a config whose fields have their types, or None when a section is
  refused; the problems every section's own checks and the model's find, each naming its
  field)."""
  nested, problems = {}, []
  for section in ("router", "balancing", "dispatch"):
    kind = SETTINGS_SECTIONS[section]
    try:
      nested[section] = kind.from_section(config[section])
    except ConfigError as error:
      problems += error.problems
      nested[section] = kind.unchecked(config[section])
  try:
    spec = ModelSpec.from_section(config.model, **nested)
  except ConfigError as error:
    return None, problems + error.problems
  return (None if problems else spec), problems


def _section_problems(config, section: str) -> list[str]:
  if section not in config:   # an optional section left out: its defaults
    return []
  try:
    SETTINGS_SECTIONS[section].from_section(config[section])
    return []
  except ConfigError as error:
    return error.problems


def _backend_problems(config, backend: str) -> list[str]:
  """Kernels and collectives asked for on a backend without them (they would fail inside the
  first step)."""
  problems = []
  if config.dispatch.expert_parallel == "ragged_all_to_all" and backend == "cpu":
    problems.append("dispatch.expert_parallel='ragged_all_to_all' needs a GPU or TPU backend: the "
                    "cpu backend has no ragged_all_to_all; use 'all_to_all' or 'all_gather'")
  kernels = config.dispatch.grouped_matmul
  if backend != "gpu" and config.dispatch.strategy == "dropless" and kernels in ("mosaic",
                                                                                 "pallas"):
    problems.append(f"dispatch.grouped_matmul={kernels!r} runs GPU kernels, but the backend is "
                    f"{backend}: use 'auto' (or 'tiles', 'xla', 'interpret')")
  if backend != "gpu" and config.model.attention_implementation == "cudnn":
    problems.append(f"model.attention_implementation='cudnn' needs an NVIDIA GPU, but the backend "
                    f"is {backend}: use 'auto' (or 'xla')")
  return problems


def _problems(config, num_devices: int, backend: str, granules: int) -> list[str]:
  problems = _schema_problems(config)
  if problems:   # the value checks below assume every field is there with its type
    return problems
  problems = [p for s in ("data", "optimizer", "train", "pipeline")
              for p in _section_problems(config, s)]
  spec, model_problems = model_spec(config)
  problems += model_problems
  need = lambda ok, message: ok or problems.append(message)
  d, o, t = config.data, config.optimizer, config.train
  need(config.seed >= 0, f"seed={config.seed} must be >= 0")

  # checks that span sections
  need(config.model.mtp_depth < d.seq_len,
       f"model.mtp_depth={config.model.mtp_depth} must be below data.seq_len={d.seq_len}")
  problems.extend(_backend_problems(config, backend))
  if d.source != "tokens":
    need(config.model.vocab_size >= tokenization.MIN_VOCAB,
         f"model.vocab_size={config.model.vocab_size} is too small for data.tokenizer="
         f"{d.tokenizer!r}: needs >= {tokenization.MIN_VOCAB} (256 bytes + pad + bos)")
  need(o.warmup_steps < t.steps,
       f"optimizer.warmup_steps={o.warmup_steps} must be >= 0 and below train.steps={t.steps}")

  try:
    mesh_sizes = resolve_mesh_shape(dict(config.mesh), num_devices)
  except ConfigError as e:
    problems.append(str(e))
  else:
    if spec is not None:
      problems.extend(_sharding_problems(config, spec, mesh_sizes))
      problems.extend(_pipeline_problems(config, spec, mesh_sizes, backend))
    problems.extend(_dcn_problems(dcn_sizes(config), mesh_sizes, granules))
  return problems


def validate_config(config, num_devices: int, backend: str | None = None,
                    granules: int | None = None) -> None:
  """Raises ConfigError naming every field that makes `config` impossible to run.

  `backend` ("cpu", "gpu", "tpu") defaults to jax's default backend, `granules` (TPU slices
  or processes, for a hybrid mesh) to this run's.
  """
  if backend is None:
    import jax
    backend = jax.default_backend()
  if granules is None:
    granules = parallel.granule_count()
  problems = _problems(config, num_devices, backend, granules)
  if problems:
    raise ConfigError.listing(problems)
