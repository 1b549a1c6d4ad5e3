"""The training step's loss and gradients with the MoE blocks as pipeline stages over the mesh
axis `stage`.

What runs where: the embedding and the dense blocks run before the pipeline, on the whole
batch (the compiler splits them over the batch's mesh axes; each stage device holds them);
the scanned MoE block stack is split into stages of consecutive blocks (`model_stages`), one
per `stage` device, two for DualPipeV; the final norm, the output projection, the
cross-entropy and the MTP modules (which read the last block's hidden states and the
embeddings of the tokens ahead) run inside the pipeline, as the last stage's loss. The batch
is cut into `microbatches` slices exactly as gradient accumulation cuts it (`batch_slices`:
slice m holds rows m, m + M, ...), so the step computes the loss, gradients and routing
statistics of the unpipelined step with as many slices: each stage sees whole micro-batches
(the data axes stay automatic inside the pipeline), so its balancing losses are the whole
micro-batch's. With the expert-parallel dispatch or cuDNN's attention every mesh axis is
manual inside: each device runs its shard of the micro-batches (and its share of the
experts), its losses and statistics are divided by the shards too, and the MoE layers take
the Switch loss's means over all shards (moe_jax/layers/moe.py). The gradients come back in
three parts (the stages', the head's, the micro-batches' for the embedding and dense blocks)
and are put back in the parameters' tree by the pullbacks of the functions that took those
parts out.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.dispatch.expert_parallel import EXPERT_AXIS
from moe_jax.layers.params import logical_axes
from moe_jax.model import REMAT_POLICIES, mtp_losses
from moe_jax.pipeline import schedules
from moe_jax.pipeline.model_stages import as_stages, layout, moe_stack, stage_function
from moe_jax.pipeline.scheduled import lockstep_bubble, scheduled, tick_table
from moe_jax.routing import BalancingValues

AXIS = "stage"   # the mesh axis the stages are split over
# The pipeline's shard_map is manual over `stage` and leaves the other mesh axes to the
# compiler (each stage sees whole micro-batches), except where something inside needs its own
# device's shard: expert parallelism's exchange, and cuDNN's fused attention, whose custom
# partitioner fails under a shard_map that leaves axes to the compiler. Then the pipeline is
# manual over every axis, the batch split over these (`tensor` must be 1: config validation).
BATCH_AXES = ("data", "fsdp", "tensor", "expert")


def every_axis_manual(spec, backend: str | None = None) -> bool:
  """Whether a pipeline of this model runs manual over every mesh axis on `backend` ("gpu":
  NVIDIA's; default: this process's): with the expert-parallel dispatch or cuDNN's attention."""
  return spec.dispatch.expert_parallel != "none" or spec.attention_path(backend) == "cudnn"


def batch_slices(a, microbatches: int):
  """[B, ...] -> [M, B / M, ...], slice m holding rows m, m + M, m + 2M, ...: each device keeps
  its share of every slice. Gradient accumulation (`steps.accumulated_gradients`) and the
  pipeline cut a batch this way, so that the two compute the same step."""
  return a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]).swapaxes(0, 1)


class Pipeline(NamedTuple):
  """A schedule's name and the MoE blocks of each stage it runs (as many stages as stage
  devices, twice that for DualPipeV)."""

  schedule: str
  block_counts: tuple[int, ...]
  every_axis_manual: bool = False   # also where `every_axis_manual` does not ask it (tests)


def summary(schedule: str, stage_devices: int, microbatches: int) -> str:
  """One line for the start of a run: the schedule, its bubble as `schedules.simulate`
  computes it (a backward twice a forward) and as the runner's lockstep ticks leave it, and
  the activations it holds."""
  plan = schedules.make(schedule, stage_devices, microbatches)
  bubble = schedules.simulate(plan).bubble_fraction
  lockstep = lockstep_bubble(tick_table(plan))
  return (f"pipeline: {schedule}, {plan.num_stages} stages on {stage_devices} devices of mesh "
          f"axis 'stage', {microbatches} micro-batches: bubble {100 * bubble:.1f}% "
          f"of device time (computed from the schedule, a backward twice a forward; "
          f"{100 * lockstep:.1f}% in the runner's lockstep ticks), at most "
          f"{max(schedules.peak_activations(plan))} micro-batches' activations held per device")


def pipelined_gradients(params, biases, graphdef, tokens, pipeline: Pipeline, microbatches: int,
                        mtp_weight, balancing: BalancingValues):
  """((loss, (cross_entropy, stats, mtp metrics)), grads) as `jax.value_and_grad(steps.loss_fn)`
  over `microbatches` slices gives them (`steps.accumulated_gradients`), run through
  `pipeline`; the MTP losses weighted by `mtp_weight` and the blocks' auxiliary losses by
  `balancing`."""
  inputs = tokens[:, :-1]
  batch, seq_len = inputs.shape
  model = nnx.merge(graphdef, params, biases)
  stack = moe_stack(model, pipeline.block_counts)
  stages = layout(pipeline.block_counts)
  positions = jnp.arange(seq_len)

  def before(params):
    """The embedding and the dense blocks: the pipeline's input, [B, S, D]."""
    m = nnx.merge(graphdef, params, biases)
    with jax.named_scope("embed"):
      x = m.embed_tokens(inputs)
    if m.dense_blocks is not None:
      x, _ = m.dense_blocks(x, positions, policy=REMAT_POLICIES[m.spec.remat])
    return x

  def parts(params):
    """The stages' state [S, L / S, ...] and what the last stage's loss reads (the final norm,
    the output and input embeddings, the MTP modules), taken out of `params`."""
    m = nnx.merge(graphdef, params, biases)
    return (as_stages(nnx.state(m.moe_blocks.layers), stages),
            (nnx.state(m.final_norm), m.unembed[...], nnx.state(m.mtp), m.embed[...]))

  stage_fn = stage_function(nnx.graphdef(stack.layers), seq_len, balancing, stages.padded)
  # Manual over every mesh axis (expert parallelism, cuDNN's attention): each device runs its
  # shard of every micro-batch (and its share of the routed experts); the losses are then
  # means over its shard, summed over the shards.
  expert_parallel = model.spec.dispatch.expert_parallel != "none"
  manual = pipeline.every_axis_manual or every_axis_manual(model.spec)
  batch_axes = BATCH_AXES if manual else None
  mesh = jax.sharding.get_abstract_mesh()
  parts_of_mean = microbatches * math.prod(mesh.shape[a] for a in batch_axes or ())

  def stage(state, x):
    y, (aux_loss, stats) = stage_fn(state, x)
    return y, (aux_loss / parts_of_mean, stats)   # the loss is the mean over slices

  head_loss = _head_loss(model, parts_of_mean, mtp_weight, balancing)
  slices = lambda a: batch_slices(a, microbatches)
  whole = lambda a: a.swapaxes(0, 1).reshape(batch, *a.shape[2:])   # batch_slices undone
  x, before_pullback = jax.vjp(before, params)
  (stage_state, head), parts_pullback = jax.vjp(parts, params)
  specs = {}
  if expert_parallel:   # the routed experts split over `expert`, the rest whole
    specs = dict(param_specs=_experts_split(stage_state, (AXIS, None)),
                 loss_param_specs=_experts_split(head, ()))
  result = scheduled(pipeline.schedule, stage, head_loss, AXIS, batch_axes, has_aux=True,
                     loss_has_aux=True, **specs)(stage_state, slices(x), slices(tokens), head)
  (grads_before,) = before_pullback(whole(result.input_grads).astype(x.dtype))
  (grads_parts,) = parts_pullback((result.grads, result.loss_grads))
  grads = jax.tree.map(jnp.add, grads_before, grads_parts)
  # Sums over the micro-batches (and shards): means once divided by their number (counts stay
  # sums).
  cross_entropy, mtp_loss_sums, mtp_accuracy_sums, mtp_stats = result.loss_stats
  stats = jax.tree.map(stages.blocks, result.stats)   # [L, ...]
  if mtp_stats:   # the MTP blocks' statistics follow the main blocks' (model.moe_layers)
    stats = jax.tree.map(lambda main, extra: jnp.concatenate([main, extra]), stats, mtp_stats)
  mtp = {}
  for depth in range(1, len(model.mtp) + 1):
    mtp[f"mtp_loss/depth{depth}"] = mtp_loss_sums[depth - 1] / parts_of_mean
    mtp[f"mtp_accuracy/depth{depth}"] = mtp_accuracy_sums[depth - 1] / parts_of_mean
  return (result.loss, (cross_entropy / parts_of_mean, stats.over_slices(parts_of_mean), mtp)
          ), grads


def _experts_split(tree, leading: tuple):
  """PartitionSpecs for the leaves of `tree` (a stage's state, whose variables' first
  dimension, "layers", is [S, K] here, given by `leading`; or the head's, `leading` ()): `expert`
  on a variable's dimension named "experts" (expert parallelism's split); for the arrays that
  are not variables (a padded layout's `real` [S, K], the embeddings), `leading`'s first axis
  only."""
  def spec(leaf):
    if not isinstance(leaf, nnx.Variable):
      return P(*leading[:1])
    names = logical_axes(leaf) or ()
    own = names[1:] if leading else names
    return leaf.replace(P(*leading, *[EXPERT_AXIS if n == "experts" else None for n in own]))
  return jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _head_loss(model, parts: int, mtp_weight, balancing: BalancingValues):
  """The last stage's loss of one micro-batch (or of one device's shard of it),
  `(head, h [b, S, D], window [b, S + 1]) -> (loss / parts, (cross-entropy, MTP losses [K],
  MTP accuracies [K], MTP blocks' MoEStats [K, ...] or ()))`, `parts` the micro-batches (times
  the shards): the next token's cross-entropy, and with K MTP modules (DeepSeek-V3's) their
  losses weighted by mtp_weight / K and their blocks' balancing losses weighted by
  `balancing`, as `steps.loss_fn` adds them."""
  norm_graphdef, mtp_graphdef = nnx.graphdef(model.final_norm), nnx.graphdef(model.mtp)
  dtype, depths = model.dtype, len(model.mtp)

  def head_loss(head, h, window):
    norm_state, unembed, mtp_state, embed = head
    inputs, targets = window[:, :-1], window[:, 1:]
    token_losses = lambda features, targets: model.token_losses(features, targets, unembed)
    cross_entropy = token_losses(nnx.merge(norm_graphdef, norm_state)(h), targets)[0].mean()
    if not depths:
      return cross_entropy / parts, (cross_entropy, jnp.zeros(0), jnp.zeros(0), ())
    hidden, mtp_features, stats = h, [], []
    with jax.named_scope("mtp"):
      for depth, module in enumerate(nnx.merge(mtp_graphdef, mtp_state), start=1):
        length = inputs.shape[1] - depth
        joined = module.join(hidden[:, :length], embed[inputs[:, depth:]].astype(dtype))
        hidden, block_stats = model.run_block(module.block, joined, jnp.arange(length))
        stats.append(block_stats)
        mtp_features.append(module.final_norm(hidden))
      losses, accuracies = mtp_losses(token_losses, mtp_features, window)
    stats = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stats)
    total = (cross_entropy + mtp_weight * jnp.mean(jnp.stack(losses))
             + balancing.aux_loss(stats))
    return total / parts, (cross_entropy, jnp.stack(losses),
                                  jnp.stack(accuracies).astype(jnp.float32), stats)

  return head_loss
