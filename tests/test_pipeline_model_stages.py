"""A model's scanned MoE blocks as pipeline stages on 8 simulated devices: run by 1F1B and
DualPipeV, the loss (with the blocks' balancing losses), the gradients of the blocks and of
their input, and each block's expert counts equal the unsplit stack's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.model import Transformer
from moe_jax.pipeline.model_stages import moe_stages
from moe_jax.pipeline.schedules import ScheduleError
from moe_jax.pipeline.scheduled import scheduled
from moe_jax.routing import BalancingSettings, BalancingValues
from tests.model_variants import SMALL

SEQ, ROWS, MICROBATCHES = 8, 4, 4


def _loss(_, h, targets):
  return jnp.sum((h - targets) ** 2) * 1e-2


@pytest.mark.parametrize("name,devices,block_counts", [("1f1b", 2, (3, 1)),
                                                       ("dualpipev", 2, (1, 1, 1, 1))])
def test_moe_blocks_as_stages_equal_the_unsplit_stack(name, devices, block_counts):
  """Uneven stages (3 and 1 blocks: the lighter stage padded with skipped blocks, whose
  gradients are zeros) and DualPipeV's even ones (even splits under every schedule:
  test_pipeline_training.py)."""
  spec = SMALL.replace(num_layers=5, num_dense_layers=1, scan_layers=True)
  model = Transformer(spec, nnx.Rngs(params=0))
  balancing = BalancingValues.of(BalancingSettings(switch_loss_alpha=0.01,
                                                   sequence_loss_alpha=0.001, z_loss_coef=0.001))
  stage_fn, stage_state = moe_stages(model, block_counts, SEQ, balancing)
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (MICROBATCHES, ROWS, SEQ, spec.d_model))
  targets = jax.random.normal(keys[1], x.shape)
  graphdef, state = nnx.split(model.moe_blocks.layers)

  def unsplit(state, x):
    """Every micro-batch through the whole stack: summed losses, and counts per block."""
    total, counts = 0.0, 0.0
    for m in range(MICROBATCHES):
      h, stats = jax.lax.scan(
          lambda h, s: nnx.merge(graphdef, s)(h, jnp.arange(SEQ)), x[m], state)
      total = total + _loss(None, h, targets[m]) + jnp.sum(
          0.01 * stats.switch_loss + 0.001 * stats.sequence_loss + 0.001 * stats.z_loss)
      counts = counts + stats.counts
    return total, counts

  (expected_loss, expected_counts), (expected_grads, expected_input) = jax.jit(
      jax.value_and_grad(unsplit, (0, 1), has_aux=True))(state, x)
  # The rows split over `data` too, which the pipeline leaves to the compiler (batch_axes
  # None): a stage sees whole micro-batches, so its balancing losses are the whole
  # micro-batch's (Switch's is a product of means: per-shard ones would differ by 0.1-0.4%).
  mesh = jax.make_mesh((devices, 2), ("stage", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:2 * devices])
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    result = jax.jit(scheduled(name, stage_fn, _loss, "stage", None, has_aux=True))(
        stage_state, jax.device_put(x, rows), jax.device_put(targets, rows))
  np.testing.assert_allclose(result.loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(result.input_grads, expected_input, rtol=1e-4, atol=1e-6)
  grads = result.grads[0] if len(set(block_counts)) > 1 else result.grads   # (blocks, real)
  merge = lambda a: np.concatenate([a[s, :n] for s, n in enumerate(block_counts)])  # [L, ...]
  padding = lambda a: np.concatenate([a[s, n:] for s, n in enumerate(block_counts)])
  for got, want in zip(jax.tree.leaves(jax.tree.map(merge, grads)),
                       jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for leaf in jax.tree.leaves(jax.tree.map(padding, grads)):
    np.testing.assert_array_equal(leaf, 0)
  np.testing.assert_array_equal(merge(result.stats.counts), expected_counts)


def test_a_model_that_does_not_split_into_the_stages_is_refused_by_name():
  listed = Transformer(SMALL.replace(num_layers=5, num_dense_layers=1), nnx.Rngs(params=0))
  with pytest.raises(ScheduleError, match="set model.scan_layers=True"):
    moe_stages(listed, (2, 2), SEQ, BalancingValues.off())
  scanned = Transformer(SMALL.replace(num_layers=5, num_dense_layers=1, scan_layers=True),
                        nnx.Rngs(params=0))
  with pytest.raises(ScheduleError, match=r"4 MoE blocks do not split into stages of \[2, 1\]"):
    moe_stages(scanned, (2, 1), SEQ, BalancingValues.off())
