"""Training steps on a mesh, jitted as the training loop jits them (the state's layout kept
across steps): shared by the tests that compare meshes with one device."""

import jax
from flax import nnx

from moe_jax import parallel, steps
from moe_jax.layers.moe import BalancingBias
from moe_jax.model import ModelSpec
from moe_jax.routing import BalancingSettings, BalancingValues
from moe_jax.train import reused_jit


ADAMW = steps.make_optimizer(1e-2, 0.9, 0.95, 0.1, 1.0)   # one object: equal steps are reused


def train_on_mesh(config, mesh, batches, rules, tx=None, zero1: bool = False, *,
                  microbatches: int = 1, pipeline=None, metrics_out: list | None = None,
                  bias_offset=None):
  """(state after one step per batch, losses) of the config's model laid out on `mesh` by
  `rules` (ZeRO-1 with `zero1`); AdamW unless another optimizer `tx` is given; each batch in
  `microbatches` slices, through `pipeline` (steps.train_step's) when given; a model with MTP
  modules weighs their loss by the config's MTP weights. `metrics_out`
  receives each step's metrics. `bias_offset` [E] is added to every balancing bias at the
  start (skewed routing)."""
  tx = tx or ADAMW
  graphdef, state = steps.init_state(ModelSpec.from_config(config), tx, 0)
  if bias_offset is not None:
    skewed = jax.tree.map(lambda b: b + bias_offset, state.biases.filter(BalancingBias))
    state = state._replace(biases=nnx.merge_state(state.biases, skewed))
  with jax.set_mesh(mesh):
    shardings = parallel.state_shardings(state, mesh, rules, zero1)
    state = jax.device_put(state, shardings)
    step = reused_jit(steps.train_step, out_shardings=(shardings, None), graphdef=graphdef,
                      tx=tx, bias_update_rule=config.balancing.bias_update_rule,
                      microbatches=microbatches, pipeline=pipeline,
                      replan_every=config.dispatch.replica_replan_every)
    model = config.model   # the MTP loss weight switches between the batches, as in a run
    mtp = (steps.MTPWeights.for_run(model.mtp_loss_weight, model.mtp_loss_weight_final,
                                    model.mtp_weight_switch_fraction, len(batches))
           if model.mtp_depth else None)
    balancing = BalancingValues.of(
        BalancingSettings.from_section(config.balancing).replace(bias_update_rate=1e-2))
    losses = []
    for batch in batches:
      state, metrics = step(state, parallel.global_batch(batch, mesh, rules["batch"]), None, mtp,
                            balancing)
      losses.append(float(metrics["loss"]))
      if metrics_out is not None:
        metrics_out.append(jax.device_get(metrics))
  return state, losses
