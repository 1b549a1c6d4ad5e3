"""The training step with pipeline stages on 8 simulated devices: every schedule, with data
shards, FSDP or experts split over `expert` beside the stages (and with every mesh axis manual
inside, as cuDNN's attention runs it on GPUs), gives the loss, the updated
parameters and the balancing-bias update of the unpipelined step that cuts the batch into as
many slices; a pipelined run resumes exactly and prints its schedule's bubble."""

import json

import jax
import numpy as np
import optax
import pytest

from moe_jax import parallel
from moe_jax.checkpoint import Checkpointer
from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT
from moe_jax.pipeline.training import Pipeline
from moe_jax.train import train_and_evaluate
from tests.mesh_steps import train_on_mesh

MICROBATCHES = 4
TX = optax.sgd(0.1, momentum=0.9)   # linear in the gradients: Adam would magnify float32 noise
# 1F1B over four stage devices is tests/test_pipeline_scheduled.py's (the schedule alone, on a
# stage function of its own).
CASES = {   # schedule, MoE blocks per stage, stage devices, (data, fsdp, tensor, expert), ZeRO-1,
            # every mesh axis manual inside the pipeline (as with cuDNN's attention on GPUs)
    "gpipe, stage 4 x data 2": ("gpipe", (1, 1, 1, 1), 4, (2, 1, 1, 1), False, False),
    "1f1b, stage 2 x expert 4 (experts split by sharding.experts)": (
        "1f1b", (2, 2), 2, (1, 1, 1, 4), False, False),
    "dualpipev, stage 2 x fsdp 2 x data 2": (
        "dualpipev", (1, 1, 1, 1), 2, (2, 2, 1, 1), False, False),
    # every mesh axis manual inside the pipeline: cuDNN attention's layout on GPUs
    "1f1b, stage 2 x data 2 x fsdp 2, ZeRO-1, stages of 3 and 1 blocks, every axis manual": (
        "1f1b", (3, 1), 2, (2, 2, 1, 1), True, True),
}


def _config(tiny_config):
  c = tiny_config
  c.model.num_layers, c.model.num_dense_layers = 5, 1   # 4 MoE blocks: 4 stages of 1, 2 of 2
  c.model.scan_layers = True
  c.balancing.switch_loss_alpha, c.balancing.sequence_loss_alpha = 0.01, 0.001
  c.balancing.z_loss_coef = 0.001
  c.dispatch.capacity_factor = 8.0    # nothing drops: per-device groups compute alike
  return c


def _mesh(stage, sizes):
  data, fsdp, tensor, expert = sizes
  return parallel.make_mesh(data, expert, jax.devices()[:stage * data * fsdp * tensor * expert],
                            fsdp=fsdp, tensor=tensor, stage=stage)


@pytest.fixture(scope="module")
def batches():
  return [np.random.default_rng(i).integers(0, 256, (16, 33), dtype=np.int32) for i in range(2)]


@pytest.fixture(scope="module")
def unpipelined(batches):
  """(state, losses, metrics) of the steps on one device, the batch in as many slices."""
  from configs.default import get_config
  config = _config(get_config("tiny"))
  metrics = []
  state, losses = train_on_mesh(config, _mesh(1, (1, 1, 1, 1)), batches,
                                parallel.parse_rules(config.sharding), TX,
                                microbatches=MICROBATCHES, metrics_out=metrics)
  return state, losses, metrics


@pytest.mark.parametrize("case", list(CASES))
def test_a_pipelined_step_equals_the_unpipelined_one(tiny_config, batches, unpipelined, case):
  """Two steps of SGD with momentum (lr 0.1) and the bias update: losses, cross-entropy and
  expert counts within 1e-5 relative, parameters and biases within 1e-5 relative + 1e-6 (an
  uneven split's padding blocks leave no trace in them); the
  MoE blocks' parameters and momenta split over `stage` (and the momenta over `data` too with
  ZeRO-1)."""
  schedule, block_counts, stage, sizes, zero1, every_axis_manual = CASES[case]
  config = _config(tiny_config)
  rules = parallel.parse_rules(config.sharding)
  piped_metrics = []
  piped, piped_losses = train_on_mesh(config, _mesh(stage, sizes), batches, rules,
                                      TX, zero1, microbatches=MICROBATCHES,
                                      pipeline=Pipeline(schedule, block_counts,
                                                        every_axis_manual),
                                      metrics_out=piped_metrics)
  plain, losses, metrics = unpipelined
  np.testing.assert_allclose(piped_losses, losses, rtol=1e-5)
  for got, want in zip(piped_metrics, metrics):
    np.testing.assert_allclose(got["cross_entropy"], want["cross_entropy"], rtol=1e-5)
    np.testing.assert_allclose(got["routing"]["counts"], want["routing"]["counts"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((piped.params, piped.biases)),
                  jax.tree.leaves((plain.params, plain.biases))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  held = [leaf for leaf in jax.tree.leaves(piped.params) if "stage" in str(leaf.sharding.spec)]
  assert held, "the MoE blocks' parameters are split over the stage devices"
  momenta = [leaf for leaf in jax.tree.leaves(piped.opt_state) if leaf.ndim >= 2]
  assert any("stage" in str(leaf.sharding.spec) for leaf in momenta)   # they follow the blocks
  if zero1:
    assert all("data" in str(leaf.sharding.spec) for leaf in momenta)


EXPERT_PARALLEL_CASES = {   # variant, schedule, mesh, MTP depth, capacity factor, reference
    # Drops at capacity 1: the reference is the same variant unpipelined on the same devices.
    "all_to_all, 1f1b, stage 2 x expert 4, capacity 1": (
        "all_to_all", "1f1b", (1, 1, 1, 4), 0, 1.0, "same devices"),
    "all_gather, dualpipev, stage 2 x data 2 x expert 2, MTP depth 2": (
        "all_gather", "dualpipev", (2, 1, 1, 2), 2, 8.0, "one device"),
}


@pytest.mark.parametrize("case", list(EXPERT_PARALLEL_CASES))
def test_expert_parallelism_inside_the_pipeline_equals_the_unpipelined_step(tiny_config, batches,
                                                                              case):
  """dispatch.expert_parallel inside the stages (every mesh axis manual, each device on its
  shard of every micro-batch and its share of the routed experts, the MTP modules' too) gives
  the losses, cross-entropy, expert counts, Switch loss, dropped fraction, parameters and
  biases of the unpipelined step (tolerances as above): the Switch loss from the whole
  micro-batch's statistics, the means over shards, the experts' gradients summed over `data`
  only, the drops counted once. DeepSeek-V3's MTP modules (each an MoE block) run after the
  output head on the last stage: each depth's loss, the last depth's accuracy and the MTP
  blocks' counts (after the 4 main MoE blocks') as the unpipelined step's."""
  variant, schedule, sizes, depth, capacity, reference = EXPERT_PARALLEL_CASES[case]
  strategy = DISPATCHER_OF_VARIANT[variant]
  blocks = (1, 1, 1, 1) if schedule == "dualpipev" else (2, 2)
  runs = []
  for stage, mesh_sizes, expert_parallel, pipeline in (
      (2, sizes, variant, Pipeline(schedule, blocks)),
      (1, sizes, variant, None) if reference == "same devices" else
      (1, (1, 1, 1, 1), "none", None)):
    config = _config(tiny_config)
    config.model.mtp_depth, config.dispatch.capacity_factor = depth, capacity
    config.dispatch.strategy, config.dispatch.expert_parallel = strategy, expert_parallel
    metrics = []
    state, losses = train_on_mesh(config, _mesh(stage, mesh_sizes), batches,
                                  parallel.parse_rules(config.sharding), TX,
                                  microbatches=MICROBATCHES, pipeline=pipeline,
                                  metrics_out=metrics)
    runs.append((state, losses, metrics))
  if capacity == 1.0:
    assert runs[1][2][0]["routing"]["dropped_fraction"].max() > 0.01   # the case drops
  (piped, piped_losses, piped_metrics), (plain, losses, metrics) = runs
  np.testing.assert_allclose(piped_losses, losses, rtol=1e-5)
  for got, want in zip(piped_metrics, metrics):
    assert got["routing"]["counts"].shape[0] == 4 + depth   # the MTP blocks' rows last
    for name in ("cross_entropy", *(f"mtp_loss/depth{d}" for d in range(1, depth + 1)),
                 *([f"mtp_accuracy/depth{depth}"] if depth else [])):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    for name in ("counts", "switch_loss", "dropped_fraction"):
      np.testing.assert_allclose(got["routing"][name], want["routing"][name], rtol=1e-5,
                                 atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves((piped.params, piped.biases)),
                  jax.tree.leaves((plain.params, plain.biases))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_pipelined_run_resumes_exactly_and_prints_its_bubble(tiny_config, tmp_path, capsys):
  """4 steps straight == 2 steps, stop, resume to 4, bitwise on CPU, with 1F1B over stage 2 x
  data 4; the run starts by printing the schedule's bubble: (S - 1) / (M + S - 1) = 1/5 for
  2 stages and 4 micro-batches."""
  config = _config(tiny_config)
  config.mesh.update(stage=2, data=4)
  config.data.batch_size, config.train.microbatches = 16, MICROBATCHES
  config.optimizer.warmup_steps = 1
  config.train.update(steps=4, log_every=1, eval_every=100, checkpoint_every=100,
                      sample_tokens=0)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(config, straight)
  assert ("pipeline: 1f1b, 2 stages on 2 devices of mesh axis 'stage', 4 micro-batches: "
          "bubble 20.0% of device time") in capsys.readouterr().out
  train_and_evaluate(config, resumed, stop_after_step=2)
  assert Checkpointer(resumed / "checkpoints", 2).latest_step() == 2
  train_and_evaluate(config, resumed)
  losses = lambda workdir: {r["step"]: r["loss"] for r in
                            map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}
  assert sorted(losses(resumed)) == [1, 2, 3, 4]
  assert losses(resumed) == losses(straight)
  states = [Checkpointer(w / "checkpoints", 2).manager.restore(4)["state"]
            for w in (straight, resumed)]
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
