"""The training step's loss and gradients with the MoE blocks as pipeline stages over the mesh
axis `stage`.

What runs where: the embedding and the dense blocks run before the pipeline, on the whole
batch (the compiler splits them over the batch's mesh axes; each stage device holds them);
the scanned MoE block stack is split into stages of consecutive blocks (`model_stages`), one
per `stage` device, two for DualPipeV; the final norm, the output projection and the
cross-entropy run inside the pipeline, as the last stage's loss. The batch is cut into
`microbatches` slices exactly as gradient accumulation cuts it (`steps.accumulated_gradients`:
slice m holds rows m, m + M, ...), so the step computes the loss, gradients and routing
statistics of the unpipelined step with as many slices: each stage sees whole micro-batches
(the data axes stay automatic inside the pipeline), so its balancing losses are the whole
micro-batch's. The gradients come back in three parts (the stages', the head's, the
micro-batches' for the embedding and dense blocks) and are put back in the parameters' tree by
the pullbacks of the functions that took those parts out.

Not yet run in a pipeline: multi-token prediction (refused by config validation).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.layers.logits import output_logits
from moe_jax.model import REMAT_POLICIES
from moe_jax.pipeline import schedules
from moe_jax.pipeline.model_stages import as_stages, moe_stack, stage_function
from moe_jax.pipeline.scheduled import scheduled

AXIS = "stage"   # the mesh axis the stages are split over


class Pipeline(NamedTuple):
  """A schedule's name and how many stages it runs (stage devices, twice that for DualPipeV)."""

  schedule: str
  stages: int


def summary(schedule: str, stage_devices: int, microbatches: int) -> str:
  """One line for the start of a run: the schedule, its bubble as `schedules.simulate`
  computes it (a backward twice a forward) and the activations it holds."""
  plan = schedules.make(schedule, stage_devices, microbatches)
  timeline = schedules.simulate(plan)
  return (f"pipeline: {schedule}, {plan.num_stages} stages on {stage_devices} devices of mesh "
          f"axis 'stage', {microbatches} micro-batches: bubble {100 * timeline.bubble_fraction:.1f}% "
          f"of device time (computed from the schedule, a backward twice a forward), at most "
          f"{max(schedules.peak_activations(plan))} micro-batches' activations held per device")


def pipelined_gradients(params, biases, graphdef, tokens, pipeline: Pipeline, microbatches: int):
  """((loss, (cross_entropy, stats, {})), grads) as `jax.value_and_grad(steps.loss_fn)` over
  `microbatches` slices gives them (`steps.accumulated_gradients`), run through `pipeline`."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  batch, seq_len = inputs.shape
  model = nnx.merge(graphdef, params, biases)
  stack = moe_stack(model, pipeline.stages)
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
    """The stages' state [S, L / S, ...] and the head's parameters, taken out of `params`."""
    m = nnx.merge(graphdef, params, biases)
    return (as_stages(nnx.state(m.moe_blocks.layers), pipeline.stages),
            (nnx.state(m.final_norm), m.unembed[...]))

  stage_fn = stage_function(nnx.graphdef(stack.layers), seq_len)

  def stage(state, x):
    y, (aux_loss, stats) = stage_fn(state, x)
    return y, (aux_loss / microbatches, stats)   # the loss is the mean over slices

  norm_graphdef, dtype = nnx.graphdef(model.final_norm), model.dtype

  def head_loss(head, h, targets):
    norm_state, unembed = head
    normed = nnx.merge(norm_graphdef, norm_state)(h)
    with jax.named_scope("output"):
      logits = output_logits(normed, unembed.astype(dtype))
    with jax.named_scope("cross_entropy"):
      cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return cross_entropy / microbatches

  slices = lambda a: a.reshape(batch // microbatches, microbatches, *a.shape[1:]).swapaxes(0, 1)
  whole = lambda a: a.swapaxes(0, 1).reshape(batch, *a.shape[2:])
  x, before_pullback = jax.vjp(before, params)
  (stage_state, head), parts_pullback = jax.vjp(parts, params)
  result = scheduled(pipeline.schedule, stage, head_loss, AXIS, None, has_aux=True)(
      stage_state, slices(x), slices(targets), head)
  (grads_before,) = before_pullback(whole(result.input_grads).astype(x.dtype))
  (grads_parts,) = parts_pullback((result.grads, result.loss_grads))
  grads = jax.tree.map(jnp.add, grads_before, grads_parts)
  stats = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), result.stats)   # [L, ...]
  stats = stats.over_slices(microbatches)
  aux = jnp.sum(stats.switch_loss + stats.sequence_loss + stats.z_loss)
  return (result.loss, (result.loss - aux, stats, {})), grads
