"""train_and_evaluate(config, workdir): the training loop.

Per run the workdir gets: config.json, data_manifest.json, metrics.jsonl, tensorboard/,
checkpoints/ (orbax; resumed automatically), sample.txt and expert_load.png at the end.
"""

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from moe_jax import data, parallel, steps
from moe_jax.checkpoint import Checkpointer
from moe_jax.config_validation import ConfigError, resolve_mesh_shape, validate_config
from moe_jax.live import LiveRoutingMetrics
from moe_jax.metrics import MetricWriter, plot_expert_load, summarize_routing
from moe_jax.model import ModelSpec
from moe_jax.sample import sample_text


def _schedule(config):
  o = config.optimizer
  return steps.make_schedule(o.learning_rate, o.warmup_steps, config.train.steps,
                             o.final_lr_fraction)


def evaluate(eval_fn, state, corpus_windows, num_batches, batch_per_process, mesh, batch_axes,
             is_bytes):
  """Runs the fixed validation batches and returns the summary metrics and per-layer counts."""
  totals = None
  for local in data.evaluation_batches(corpus_windows, num_batches, batch_per_process,
                                       jax.process_index(), jax.process_count()):
    sums = eval_fn(state, parallel.global_batch(local, mesh, batch_axes))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return steps.summarize_evaluation(totals, is_bytes), totals.get("counts")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       stop_after_step: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final metrics.

  `stop_after_step` ends this run early (with a checkpoint) as a preemption would; starting
  again on the same workdir continues exactly where it stopped.
  """
  validate_config(config, jax.device_count())
  mesh = parallel.make_mesh(*resolve_mesh_shape(config.mesh.data, config.mesh.expert,
                                                jax.device_count()))
  with jax.set_mesh(mesh):   # the context mesh of the expert-parallel shard_maps
    return _train(config, Path(workdir), mesh, stop_after_step)


def _train(config, workdir: Path, mesh, stop_after_step: int | None) -> dict:
  is_chief = jax.process_index() == 0
  corpus = data.load_corpus(config.data.source, config.data.path, config.data.token_dtype,
                            config.data.validation_percent, config.model.vocab_size)
  seq_len, batch_size = config.data.seq_len, config.data.batch_size
  train_windows = data.Windows(corpus.train, seq_len, "train")
  validation_windows = data.Windows(corpus.validation, seq_len, "validation")
  batch_per_process = batch_size // jax.process_count()
  train_data = data.train_dataset(train_windows, batch_per_process, config.data.shuffle_seed,
                                  jax.process_index(), jax.process_count())
  spec = ModelSpec.from_config(config.model)
  o = config.optimizer
  schedule = _schedule(config)
  tx = steps.make_optimizer(schedule, o.b1, o.b2, o.weight_decay, o.grad_clip_norm)
  graphdef, state = steps.init_state(spec, tx, config.seed)
  rules = parallel.parse_rules(config.sharding)
  try:
    shardings = parallel.state_shardings(state, mesh, rules, o.shard_over_data)
  except parallel.LayoutError as error:
    raise ConfigError(f"invalid config:\n  - {error}") from None
  state = jax.device_put(state, shardings)

  # Data and layout are known good: only now does the workdir receive anything.
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = Checkpointer(workdir / "checkpoints", config.train.checkpoints_to_keep)
  data_iterator = iter(train_data)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state, data_state = checkpointer.restore(start_step, state, config.model.to_dict())
    data_iterator.set_state(data_state)
    print(f"Resumed from the checkpoint at step {start_step} in {workdir / 'checkpoints'}")
  if is_chief:   # after a refused resume these still describe the checkpointed run
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "data_manifest.json").write_text(json.dumps(corpus.manifest, indent=2))

  m = config.model
  train_fn = jax.jit(functools.partial(
      steps.train_step, graphdef=graphdef, tx=tx, bias_update_rate=m.bias_update_rate,
      bias_update_rule=m.bias_update_rule, bias_freeze_step=m.bias_freeze_step),
      out_shardings=(shardings, None), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(steps.eval_step, graphdef=graphdef,
                                      byte_limit=data.NUM_BYTE_IDS if corpus.is_bytes else 2**31 - 1))
  run_eval = functools.partial(evaluate, eval_fn, corpus_windows=validation_windows,
                               num_batches=config.train.eval_batches,
                               batch_per_process=batch_per_process, mesh=mesh,
                               batch_axes=rules["batch"], is_bytes=corpus.is_bytes)

  writer = MetricWriter(workdir, enabled=is_chief)
  t = config.train
  live = LiveRoutingMetrics(t.metrics_port) if t.metrics_port and is_chief else None
  if live:
    print(f"Live routing metrics: http://127.0.0.1:{t.metrics_port}/metrics")
  tokens_per_step = batch_size * seq_len
  pending, last_log_time, last_log_step = [], time.perf_counter(), start_step
  last_eval, eval_counts = {}, None
  bar = tqdm(total=t.steps, initial=start_step, disable=not is_chief, unit="step",
             dynamic_ncols=True, desc="train")
  for step in range(start_step + 1, t.steps + 1):
    tokens = parallel.global_batch(next(data_iterator), mesh, rules["batch"])
    state, metrics = train_fn(state, tokens)
    pending.append(metrics)
    bar.update(1)
    if step == start_step + 1:   # keep compilation out of tokens/s
      jax.block_until_ready(metrics)
      last_log_time, last_log_step = time.perf_counter(), step
    if step % t.log_every == 0 or step == t.steps:
      fetched = jax.device_get(pending)     # the one host transfer of the whole log window
      now = time.perf_counter()
      scalars = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1] if k != "routing"}
      if "routing" in fetched[-1]:
        routing_scalars, details = summarize_routing([f["routing"] for f in fetched],
                                                     tokens_per_step * len(fetched))
        scalars.update(routing_scalars)
        writer.write_details(step, details)
        if live:
          live.update(step, scalars, details["load"])
      if step > last_log_step:
        scalars["tokens_per_second"] = tokens_per_step * (step - last_log_step) / (now - last_log_time)
      scalars["learning_rate"] = float(schedule(step - 1))
      writer.write(step, scalars)
      bar.set_postfix(loss=f"{scalars['loss']:.3f}", maxvio=f"{scalars.get('max_violation', 0):.2f}",
                      tok_s=f"{scalars.get('tokens_per_second', 0):.0f}")
      pending, last_log_time, last_log_step = [], now, step
    if step % t.eval_every == 0 or step == t.steps:
      last_eval, eval_counts = run_eval(state)
      writer.write(step, last_eval)
      bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()
                                            if "/" not in k))
    stopping = step == stop_after_step
    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
      checkpointer.save(step, state, data_iterator.get_state(), config.to_dict())
    if stopping:
      break
  bar.close()
  checkpointer.wait()
  checkpointer.close()
  if live:
    live.close()
  if stop_after_step is not None and stop_after_step < t.steps:
    writer.close()
    return last_eval

  if not last_eval:   # resumed at the end: evaluate the restored state
    last_eval, eval_counts = run_eval(state)
  if is_chief:
    _finish(config, workdir, graphdef, state, corpus.is_bytes, eval_counts, last_eval)
  writer.close()
  return last_eval


def _finish(config, workdir, graphdef, state, is_bytes, eval_counts, last_eval):
  """The end-of-run artifacts: final metrics, a text sample and the expert-load plot."""
  (workdir / "final_metrics.json").write_text(json.dumps(last_eval, indent=2))
  if is_bytes and config.train.sample_tokens:
    text = sample_text(graphdef, state.params, state.biases, config.train.sample_prompt,
                       config.train.sample_tokens, config.data.seq_len, seed=config.seed)
    (workdir / "sample.txt").write_text(text)
    print("\n--- sample ---\n" + text + "\n--------------")
  if eval_counts is not None:
    plot_expert_load(eval_counts, workdir / "expert_load.png",
                     f"validation expert load, step {config.train.steps}")
  print(f"\nOutputs in {workdir.absolute()}: metrics.jsonl, routing.jsonl, tensorboard/, checkpoints/, "
        f"final_metrics.json, data_manifest.json"
        + (", sample.txt" if is_bytes else "") + (", expert_load.png" if eval_counts is not None else ""))
