"""A run described before it runs: the resolved config with its comments (--print_config) and
a dry run (--dry_run) that validates, counts parameters and FLOPs, lays out the mesh and asks
XLA how much memory one device needs for a training step, then stops without training."""

import io
import tokenize
from pathlib import Path

import jax
import ml_collections
import numpy as np


def _assigned_field(code: str) -> str | None:
  """`section.field` of a line of code like `c.router.top_k = 2`, without the config variable's
  own name; None for any other code."""
  if "=" not in code or "==" in code:
    return None
  parts = code.split("=", 1)[0].strip().split(".")
  if len(parts) >= 2 and all(p.isidentifier() for p in parts):
    return ".".join(parts[1:])
  return None


def field_comments(source: str) -> tuple[list[str], dict[str, str]]:
  """The fields a config file assigns (`c.router.top_k = 2`), in the order it first assigns
  them, and `section.field -> comment` of those with a comment on the line, joined with the
  comment lines below that start in the same column (a variant's later reassignment keeps
  the first description)."""
  order, comments, last = [], {}, None   # last: (field, row, column) of the previous comment
  lines = source.splitlines()
  for line in lines:
    field = _assigned_field(line.split("#")[0])
    if field and field not in order:
      order.append(field)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type != tokenize.COMMENT:
      continue
    (row, column), text = token.start, token.string.lstrip("#").strip()
    code = lines[row - 1][:column].strip()
    if not code:
      if last and row == last[1] + 1 and column == last[2]:
        comments[last[0]] += " " + text
        last = (last[0], row, column)
      else:
        last = None
      continue
    field = _assigned_field(code)
    if field and field not in comments:
      comments[field] = text
      last = (field, row, column)
    else:
      last = None
  return order, comments


def config_text(config: ml_collections.ConfigDict, config_path: str,
                overridden: set[str]) -> str:
  """Every field of the resolved config, `name = value  # comment`, in the config file's
  order, fields set on the command line marked."""
  source = Path(config_path).read_text() if Path(config_path).is_file() else ""
  order, comments = field_comments(source)
  rows = []

  def walk(node, prefix):
    for key in node.keys():
      value, name = node[key], f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, name + ".")
        continue
      note = comments.get(name, "")
      if name in overridden:
        note = "[set on the command line] " + note
      rows.append((name, f"{name} = {value!r}", note))

  walk(config, "")
  rank = {name: i for i, name in enumerate(order)}
  rows.sort(key=lambda row: rank.get(row[0], len(rank)))
  width = max(len(left) for _, left, _ in rows)
  return "\n".join(f"{left:<{width}}  # {note}".rstrip() if note else left
                   for _, left, note in rows)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dry_run(config: ml_collections.ConfigDict) -> str:
  """Validates `config` (ConfigError names every problem), then compiles one training step on
  abstract inputs and reports sizes, FLOPs, the mesh and per-device memory."""
  from moe_jax import parallel, throughput
  from moe_jax.config_validation import validate_config
  from moe_jax.model import parameter_counts
  from moe_jax.pipeline.training import summary
  from moe_jax.train import (jit_train_step, laid_out_state, mesh_of, pipeline_of,
                             step_arguments_on)
  validate_config(config, jax.device_count())
  mesh = mesh_of(config)
  with jax.set_mesh(mesh):
    spec, _, tx, graphdef, abstract_state, shardings, rules = laid_out_state(config, mesh)
    counts = parameter_counts(spec)
    seq_len, batch = config.data.seq_len, config.data.batch_size
    flops = throughput.training_flops_per_token(spec, seq_len)
    step_flops = flops * batch * seq_len
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32,
                                  sharding=parallel.batch_sharding(mesh, rules["batch"]))
    pipeline = pipeline_of(config, mesh)
    compiled = jit_train_step(spec, graphdef, tx, shardings, config.train.microbatches,
                              pipeline).lower(
        abstract_state, tokens, *step_arguments_on(config, mesh)).compile()
  params_bytes = parallel.per_device_bytes(abstract_state.params)
  optimizer_bytes = parallel.per_device_bytes(abstract_state.opt_state)
  memory = compiled.memory_analysis()
  device = jax.devices()[0]
  peak = throughput.peak_tflops(device.device_kind, config.train.peak_tflops)
  lines = [
      f"config valid for {jax.device_count()} x {device.device_kind} ({jax.default_backend()})",
      f"mesh: {' x '.join(f'{n} {s}' for n, s in mesh.shape.items())}",
      *([summary(pipeline.schedule, mesh.shape["stage"], config.train.microbatches)]
        if pipeline else []),
      f"parameters: {counts['total']:,} total, {counts['active']:,} active per token "
      f"({counts['active_experts']:,} of them in experts), {counts['embedding']:,} in the "
      f"embedding and output matrices",
      f"training FLOPs per token: {flops / 1e6:,.2f} M; per step of {batch} x {seq_len} tokens: "
      + (f"{step_flops / 1e12:,.3f} TFLOP" if step_flops >= 1e12
         else f"{step_flops / 1e9:,.3f} GFLOP")
      + (f" (at 40% MFU on {peak:g} TFLOP/s devices: "
         f"{step_flops / (0.4 * peak * 1e12 * jax.device_count()) * 1e3:.1f} ms)"
         if peak else ""),
      f"per device: parameters {_gib(params_bytes)}, optimizer state {_gib(optimizer_bytes)}",
  ]
  if memory is not None:
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    limit = (device.memory_stats() or {}).get("bytes_limit")
    lines.append(f"per device, one training step as XLA compiled it: {_gib(total)} (state and "
                 f"batch in {_gib(memory.argument_size_in_bytes)}, new state out "
                 f"{_gib(memory.output_size_in_bytes)} of which {_gib(memory.alias_size_in_bytes)}"
                 f" reuses the donated input, temporaries {_gib(memory.temp_size_in_bytes)})"
                 + (f"; the device has {_gib(limit)}"
                    + ("" if total <= limit else ": it does not fit") if limit else ""))
  lines.append("dry run: nothing was trained or written")
  return "\n".join(lines)
