"""The pure step functions of training: optimizer, loss, one train step, one eval step.

State is explicit: `TrainState` holds the parameters (nnx.Param), the balancing biases (not
parameters: no gradient, not seen by the optimizer), the optimizer state and the step. Each
function takes the few values it needs and is jitted by the loop in `train.py`.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import routing
from moe_jax.dispatch import replicas
from moe_jax.dispatch.expert_parallel import EXPERT_AXIS
from moe_jax.layers.moe import RoutingState
from moe_jax.layers.params import ParamKeys
from moe_jax.model import ModelSpec, Transformer, abstract_model, mtp_losses
from moe_jax.pipeline.training import Pipeline, batch_slices, pipelined_gradients
from moe_jax.settings import Settings


class TrainState(NamedTuple):
  """`biases` is the routing state (layers/moe.py: RoutingState): the balancing biases and,
  with dispatch.expert_replicas, each layer's replica plan and the counts since it was made."""

  step: jax.Array
  params: nnx.State
  biases: nnx.State
  opt_state: optax.OptState


MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings(Settings):
  """AdamW with linear warmup, cosine decay and global-norm clipping (`optimizer`)."""

  SECTION = "optimizer"

  learning_rate: float = 1e-3
  warmup_steps: int = 0
  final_lr_fraction: float = 0.1   # the cosine decay ends at this fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  shard_over_data: bool = False    # ZeRO-1: moments of replicated parameters split over `data`
  moment_dtype: str = "float32"    # "bfloat16": Adam's moments stored in bf16 (DeepSeek-V3),
                                   # computed in float32; half the optimizer state

  def problems(self) -> list[str]:
    problems = []
    need = lambda ok, message: ok or problems.append(message)
    need(self.learning_rate > 0, f"optimizer.learning_rate={self.learning_rate} must be > 0")
    need(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
    need(0 <= self.final_lr_fraction <= 1,
         f"optimizer.final_lr_fraction={self.final_lr_fraction} must be in [0, 1]")
    need(0 <= self.b1 < 1 and 0 <= self.b2 < 1,
         f"optimizer.b1={self.b1}, b2={self.b2} must be in [0, 1)")
    need(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
    need(self.grad_clip_norm > 0, f"optimizer.grad_clip_norm={self.grad_clip_norm} must be > 0")
    need(self.moment_dtype in MOMENT_DTYPES,
         f"optimizer.moment_dtype={self.moment_dtype!r} is unknown; choose from "
         f"{sorted(MOMENT_DTYPES)}")
    return problems

  def make(self, total_steps: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(learning-rate schedule, optimizer) for a run of `total_steps`. The optimizer takes
    the schedule's values, the weight decay and the clipping norm with each update
    (`optimizer_values`: `step_values`), so it is the same object for every such value within
    a process: a jitted step taking it as a setting is found again (`train.reused_jit`), and
    runs that differ only in those values share one program."""
    schedule = make_schedule(self.learning_rate, self.warmup_steps, total_steps,
                             self.final_lr_fraction)
    return schedule, optimizer_given_values(self.b1, self.b2, MOMENT_DTYPES[self.moment_dtype])

  def step_values(self, total_steps: int) -> "OptimizerValues":
    """The values `make`'s optimizer is given with each update."""
    return OptimizerValues(self.learning_rate, self.warmup_steps, total_steps,
                           self.learning_rate * self.final_lr_fraction, self.weight_decay,
                           self.grad_clip_norm)


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int,
                  final_lr_fraction: float) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to final_lr_fraction * peak at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=learning_rate * final_lr_fraction)


class OptimizerValues(NamedTuple):
  """`make_schedule`'s values, AdamW's weight decay and the clipping norm, as arrays the
  training step takes (not constants it holds). Adam's b1 and b2 stay settings of the
  optimizer: optax computes 1 - b1 from a constant in double precision, from an array in
  float32, so arrays would change its updates in their last bits."""

  peak: float
  warmup_steps: float
  total_steps: float
  end: float
  weight_decay: float
  grad_clip_norm: float


def scheduled_rate(count, values: OptimizerValues):
  """`make_schedule(...)(count)` computed from traced values: 0 -> peak linearly over the
  warmup, then cosine decay to `end` at `total_steps` (and `end` after it)."""
  count = jnp.asarray(count, jnp.float32)
  peak, warmup, total, end = (jnp.asarray(v, jnp.float32) for v in (
      values.peak, values.warmup_steps, values.total_steps, values.end))
  warming = peak * count / jnp.maximum(warmup, 1.0)
  decay_steps = jnp.maximum(total - warmup, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay_steps) / decay_steps))
  return jnp.where(count < warmup, warming, end + (peak - end) * cosine)


def scale_by_given_schedule() -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate of the warmup-cosine schedule whose values each update is
  given (`optimizer_values=OptimizerValues(...)`): the same update count in its state
  (optax.ScaleByScheduleState, so checkpoints are alike) and the same step sizes."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, optimizer_values: OptimizerValues, **extra):
    del params, extra
    rate = -scheduled_rate(state.count, optimizer_values)
    updates = jax.tree.map(lambda g: rate.astype(g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(schedule: float | optax.Schedule, b1: float, b2: float, weight_decay: float,
                   grad_clip_norm: float, moment_dtype=jnp.float32) -> optax.GradientTransformation:
  """AdamW on the schedule (a rate or an optax schedule) after global-norm clipping; decay
  only on matrices (ndim >= 2); Adam's moments stored in `moment_dtype` (the update computed in
  float32 either way)."""
  return _adamw(optax.scale_by_learning_rate(schedule), b1, b2, moment_dtype,
                optax.add_decayed_weights(weight_decay), optax.clip_by_global_norm(grad_clip_norm))


@functools.lru_cache(maxsize=16)
def optimizer_given_values(b1: float, b2: float,
                           moment_dtype=jnp.float32) -> optax.GradientTransformation:
  """`make_optimizer` with the warmup-cosine schedule's values, the weight decay and the
  clipping norm given to each update (`optimizer_values=OptimizerValues(...)`): one object
  per setting within a process, the key of a reused jitted step."""
  return _adamw(scale_by_given_schedule(), b1, b2, moment_dtype,
                _given(lambda values: optax.add_decayed_weights(values.weight_decay)),
                _given(lambda values: optax.clip_by_global_norm(values.grad_clip_norm)))


def _given(make) -> optax.GradientTransformationExtraArgs:
  """The stateless optax transformation `make(optimizer_values)`, built at each update from
  the values given to it."""

  def update(updates, state, params=None, *, optimizer_values: OptimizerValues, **extra):
    del extra
    return make(optimizer_values).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _adamw(scale_by_rate, b1, b2, moment_dtype, decay, clip):
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  # optax.adamw's own chain, with the moments' storage chosen (the same state tree).
  return optax.chain(
      clip,
      optax.chain(scale_by_adam_stored_in(moment_dtype, b1=b1, b2=b2),
                  optax.masked(decay, decay_mask), scale_by_rate))


def scale_by_adam_stored_in(dtype, **adam) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in `dtype`: each update reads them into
  float32, runs optax's update there and stores the new moments back in `dtype` (float32
  params: exactly optax.scale_by_adam)."""
  scale = optax.scale_by_adam(**adam)
  stored = lambda state, to: state._replace(mu=optax.tree.cast(state.mu, to),
                                            nu=optax.tree.cast(state.nu, to))

  def update(updates, state, params=None):
    updates, state = scale.update(updates, stored(state, jnp.float32), params)
    return updates, stored(state, dtype)

  return optax.GradientTransformation(lambda params: stored(scale.init(params), dtype), update)


def init_state(spec: ModelSpec, tx: optax.GradientTransformation, seed):
  """(graphdef, TrainState) for a freshly initialised model; `seed` is an int or an array
  (`train.seed_argument`)."""
  model = Transformer(spec, ParamKeys(seed))
  graphdef, params, biases = nnx.split(model, nnx.Param, RoutingState)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, biases, tx.init(params))


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation, seed: int):
  """(graphdef, TrainState of ShapeDtypeStructs): the state's layout, computing nothing."""
  graphdef, params, biases = nnx.split(abstract_model(spec, seed), nnx.Param, RoutingState)
  return graphdef, TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, biases,
                              jax.eval_shape(tx.init, params))


def split_batch(tokens_BxS1):
  """Windows of S + 1 tokens -> (inputs, targets), each [B, S]."""
  return tokens_BxS1[:, :-1], tokens_BxS1[:, 1:]


def forward(graphdef, params, biases, inputs):
  return nnx.merge(graphdef, params, biases)(inputs)


class MTPWeights(NamedTuple):
  """DeepSeek-V3's MTP loss weight lambda: `early` until `switch_step`, then `late` (numbers,
  or the arrays the training step takes, so that runs of other lengths share its program)."""
  early: float = 0.0
  late: float = 0.0
  switch_step: int = 0

  @classmethod
  def for_run(cls, early: float, late: float, switch_fraction: float,
              total_steps: int) -> "MTPWeights":
    """`early` for the first `switch_fraction` of `total_steps`, then `late`."""
    return cls(early, late, round(switch_fraction * total_steps))

  def at(self, step):
    return jnp.where(step < self.switch_step, self.early, self.late)


def loss_fn(params, biases, graphdef, tokens, mtp_weight=0.0,
            balancing: routing.BalancingValues | None = None):
  """Mean next-token cross-entropy, plus the MoE layers' auxiliary losses weighted by
  `balancing`'s coefficients (none: no auxiliary loss), plus mtp_weight / D x the MTP
  modules' losses when the model has them. The statistics come back unweighted."""
  inputs, targets = split_batch(tokens)
  model = nnx.merge(graphdef, params, biases)
  mtp = {}
  if model.mtp:
    features, stats, mtp_features = model.with_mtp(inputs)
    with jax.named_scope("mtp_loss"):
      losses, accuracies = mtp_losses(model.token_losses, mtp_features, tokens)
    for depth, (loss, accuracy) in enumerate(zip(losses, accuracies), start=1):
      mtp[f"mtp_loss/depth{depth}"], mtp[f"mtp_accuracy/depth{depth}"] = loss, accuracy
  else:
    features, stats = model.features(inputs)
  cross_entropy = model.token_losses(features, targets)[0].mean()   # under the "output" scope
  total = cross_entropy
  if stats is not None and balancing is not None:
    total = total + balancing.aux_loss(stats)
  if mtp:
    total = total + mtp_weight * jnp.mean(jnp.stack(losses))
  return total, (cross_entropy, stats, mtp)


def updated_routing_state(graphdef, params, routing_state, counts_LxE, step, bias_rate,
                          bias_rule: str, replan_every: int) -> nnx.State:
  """Every MoE layer's routing state after a step whose global expert counts are `counts_LxE`:
  the aux-loss-free bias update (at `bias_rate`, an array; the bias stays as it is where the
  rate is 0) and, for layers with replicas of hot experts, the counts summed since the last
  plan, replanned (`replicas.plan_on_device`, over the context mesh's `expert` ranks) when the
  new `step` is a multiple of `replan_every`."""
  model = nnx.merge(graphdef, params, routing_state)
  ranks = dict(jax.sharding.get_abstract_mesh().shape).get(EXPERT_AXIS, 1)
  first = 0
  for layer in model.moe_layers():   # variables per expert [E], or [L, E] for L scanned layers
    bias = layer.balancing_bias[...]
    layers = bias.shape[0] if bias.ndim == 2 else 1
    counts = counts_LxE[first:first + layers].reshape(bias.shape)
    first += layers
    # set_value, not `variable[...] =`: that form asks traced values for their sharding, which
    # costs a walk over the whole trace so far (layers.params.ParamKeys); a 24-layer step
    # traced in 22.3 s that way, 6.9 s this way (docs/performance.md)
    update = lambda b, c: jnp.where(bias_rate > 0,
                                    routing.update_balancing_bias(b, c, bias_rate, bias_rule), b)
    layer.balancing_bias.set_value(jax.vmap(update)(bias, counts) if bias.ndim == 2 else
                                   update(bias, counts))
    if layer.dispatch.expert_replicas:
      slots, replica_counts = replicas.replanned(
          layer.replica_slots[...], layer.replica_counts[...] + counts,
          step % replan_every == 0, ranks)
      layer.replica_slots.set_value(slots)
      layer.replica_counts.set_value(replica_counts)
  return nnx.state(model, RoutingState)


def routing_metrics(stats) -> dict:
  """Per-layer routing statistics of one batch (its losses weighted:
  `routing.BalancingValues.weighted`), kept on device until the next log step."""
  return {"counts": stats.counts, "dropped_fraction": stats.dropped_fraction,
          "entropy": stats.entropy, "max_violation": routing.max_violation(stats.counts),
          "coactivation": stats.coactivation, "switch_loss": stats.switch_loss,
          "sequence_loss": stats.sequence_loss, "z_loss": stats.z_loss}


def accumulated_gradients(grad_fn, tokens, microbatches: int):
  """`grad_fn(tokens)` -> ((loss, (cross_entropy, stats, mtp)), grads) over the whole batch
  as `microbatches` equal slices, one after another in a scan (one slice's activations at a
  time): losses, metrics and gradients are the slices' means, expert counts and
  co-activations their sums. Slice m takes rows m, m + M, m + 2M, ..., so that every device
  keeps its share of each slice. Equal to one pass over the batch for every loss that is a
  mean over tokens or sequences (cross-entropy, z-loss, the sequence-wise loss, MTP); the
  Switch loss (a product of batch means) is taken per slice."""
  slices = batch_slices(tokens, microbatches)
  shapes = jax.eval_shape(grad_fn, slices[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  add = lambda total, micro: (jax.tree.map(jnp.add, total, grad_fn(micro)), None)
  (loss, (cross_entropy, stats, mtp)), grads = jax.lax.scan(add, zeros, slices)[0]
  mean = lambda tree: jax.tree.map(lambda a: a / microbatches, tree)
  if stats is not None:
    stats = stats.over_slices(microbatches)
  return (mean(loss), (mean(cross_entropy), stats, mean(mtp))), mean(grads)


def train_step(state: TrainState, tokens, optimizer_values: OptimizerValues | None = None,
               mtp_weights: MTPWeights | None = None,
               balancing: routing.BalancingValues | None = None, *, graphdef, tx,
               bias_update_rule: str = "sign", microbatches: int = 1,
               pipeline: Pipeline | None = None, replan_every: int = 100):
  """One optimizer step, then the bias update from this batch's global expert counts. With
  `microbatches` > 1 the gradient is accumulated over that many slices of the batch
  (`accumulated_gradients`); the bias still sees the counts of the whole batch. With a
  `pipeline` the MoE blocks run as its stages over the mesh axis `stage`, the slices as its
  micro-batches (moe_jax/pipeline/training.py): the same loss, gradients and counts. Layers
  with replicas of hot experts replan them every `replan_every` steps from their counts. An
  optimizer from `OptimizerSettings.make` takes the learning-rate schedule's values, the
  weight decay and the clipping norm as `optimizer_values` (`OptimizerValues`), a model with
  MTP modules its loss weights as `mtp_weights` (none: lambda 0), and the balancing bias's
  rate and the auxiliary losses' coefficients come as `balancing` (routing.BalancingValues;
  none: no bias update, no auxiliary loss); all are arrays, so that runs differing only in
  these values, or in their length, run the same program.

  Returns the new state and the step's metrics: scalars plus, under "routing", per-layer
  arrays (see `routing_metrics`). Nothing here waits for the host.
  """
  mtp_weight = 0.0 if mtp_weights is None else mtp_weights.at(state.step)
  balancing = routing.BalancingValues.off() if balancing is None else balancing
  grad_fn = lambda batch: jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.biases, graphdef, batch, mtp_weight, balancing)
  if pipeline is not None:
    (loss, (cross_entropy, stats, mtp)), grads = pipelined_gradients(
        state.params, state.biases, graphdef, tokens, pipeline, microbatches, mtp_weight,
        balancing)
  elif microbatches > 1:
    (loss, (cross_entropy, stats, mtp)), grads = accumulated_gradients(grad_fn, tokens,
                                                                       microbatches)
  else:
    (loss, (cross_entropy, stats, mtp)), grads = grad_fn(tokens)
  with jax.named_scope("optimizer"):
    given = {} if optimizer_values is None else {"optimizer_values": optimizer_values}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **given)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "cross_entropy": cross_entropy, "grad_norm": optax.tree.norm(grads),
               **mtp}
  biases = state.biases
  if stats is not None:
    biases = updated_routing_state(graphdef, params, biases, stats.counts, state.step + 1,
                                   balancing.bias_rate(state.step), bias_update_rule,
                                   replan_every)
    metrics["routing"] = routing_metrics(balancing.weighted(stats))
  return TrainState(state.step + 1, params, biases, opt_state), metrics


def eval_step(state: TrainState, tokens, *, graphdef, byte_counts=None):
  """Sums over one batch: cross-entropy, targets, the bytes the targets stand for (with the
  tokenizer's `byte_counts`, [vocab] ints), expert counts per layer, and the batch's MaxVio
  (mean over MoE layers) with a batch count, for the mean of per-batch MaxVio."""
  inputs, targets = split_batch(tokens)
  logits, stats = forward(graphdef, state.params, state.biases, inputs)
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  sums = {"nats": jnp.sum(nats), "targets": jnp.asarray(targets.size, jnp.float32)}
  if byte_counts is not None:
    sums["bytes"] = jnp.sum(jnp.asarray(byte_counts)[targets]).astype(jnp.float32)
  if stats is not None:
    sums["counts"] = stats.counts
    sums["batch_max_violation"] = jnp.mean(routing.max_violation(stats.counts))
    sums["batches"] = jnp.ones((), jnp.float32)
  return sums


def summarize_evaluation(sums: dict) -> dict[str, float]:
  """Validation loss, bits per byte (text corpora: all nats over the bytes the targets stand
  for, whatever the tokenizer) and MaxVio of the expert counts summed over every evaluated
  batch (Wang et al. 2024's MaxVio_global when the evaluation covers the whole split): per
  MoE layer, their mean, and the worst layer's as `validation_max_violation`; and the mean
  over batches of each batch's MaxVio (averaged over layers; their MaxVio_batch)."""
  result = {"validation_loss": float(sums["nats"] / sums["targets"])}
  if "bytes" in sums:
    result["validation_bits_per_byte"] = float(sums["nats"] / sums["bytes"] / math.log(2))
  if "counts" in sums:
    per_layer = [float(routing.max_violation(c)) for c in sums["counts"]]
    result["validation_max_violation"] = max(per_layer)
    result["validation_max_violation_mean"] = sum(per_layer) / len(per_layer)
    result.update({f"validation_max_violation/layer{i}": v for i, v in enumerate(per_layer)})
  if "batch_max_violation" in sums:
    result["validation_max_violation_batch"] = float(sums["batch_max_violation"]
                                                     / sums["batches"])
  return result
