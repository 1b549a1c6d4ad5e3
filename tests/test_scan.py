"""Scanned layers (`model.scan_layers`): the blocks as two scans over stacked parameters hold
the same parameters as the list of blocks (converted exactly both ways) and compute the same
training step, under remat policies too."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import steps
from moe_jax.layers.moe import BalancingBias
from moe_jax.model import Transformer
from moe_jax.routing import BalancingValues
from tests import model_variants

VARIANTS = {   # (MLA's scanned forward: tests/test_hf.py, a DeepSeek-V3 import)
    "MTP (stats of the scan and of the MTP block), remat expert_io":
        model_variants.SMALL.replace(mtp_depth=1, remat="expert_io"),
    "two dense blocks, remat block": model_variants.SMALL.replace(num_layers=4,
                                                                  num_dense_layers=2,
                                                                  remat="block"),
}


def _flat(model: Transformer) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model))}


def test_a_scanned_model_starts_from_the_listed_models_parameters_and_converts_exactly():
  spec = VARIANTS["two dense blocks, remat block"]
  listed = Transformer(spec, nnx.Rngs(params=0))
  scanned = Transformer(spec.replace(scan_layers=True), nnx.Rngs(params=0))
  flat = _flat(scanned)
  assert flat[("moe_blocks", "layers", "mlp", "w_gate")].shape == (2, 8, 32, 16)
  assert ("blocks", 0, "mlp", "w_up") not in flat
  want = _flat(listed)
  np.testing.assert_array_equal(flat[("dense_blocks", "layers", "mlp", "w_up")][1],
                                want[("blocks", 1, "mlp", "w_up")])
  back = _flat(scanned.with_layout(scan_layers=False))
  assert back.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(back[path], want[path], err_msg=str(path))
  again = _flat(listed.with_layout(scan_layers=True))
  for path in flat:
    np.testing.assert_array_equal(again[path], flat[path], err_msg=str(path))


def _one_step(spec, tokens):
  """(loss, parameters and biases after one SGD step, in the listed layout)."""
  tx = optax.sgd(0.1)
  graphdef, state = steps.init_state(spec, tx, 0)
  new, metrics = jax.jit(lambda s, t: steps.train_step(
      s, t, graphdef=graphdef, tx=tx,
      balancing=BalancingValues.of(spec.balancing.replace(bias_update_rate=1e-2))))(
          state, tokens)
  model = nnx.merge(graphdef, new.params, new.biases).with_layout(scan_layers=False)
  return float(metrics["loss"]), metrics, _flat(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_training_step_over_scanned_layers_equals_the_listed_step(variant):
  """Loss within 1e-5 relative; every parameter after one SGD step (lr 0.1) within 2e-5
  relative + 1e-6; each layer's balancing bias moved by the same +-rate (float32 sums of a
  scan and of unrolled layers differ in order only)."""
  spec = VARIANTS[variant]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 17)), jnp.int32)
  loss, metrics, listed = _one_step(spec, tokens)
  scan_loss, scan_metrics, scanned = _one_step(spec.replace(scan_layers=True), tokens)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  np.testing.assert_array_equal(scan_metrics["routing"]["counts"], metrics["routing"]["counts"])
  assert scanned.keys() == listed.keys()
  for path in listed:
    np.testing.assert_allclose(scanned[path], listed[path], rtol=2e-5, atol=1e-6,
                               err_msg=str(path))
  biases = [p for p in listed if p[-1] == "balancing_bias"]
  assert len(biases) == spec.num_layers - spec.num_dense_layers + spec.mtp_depth
  assert all(np.abs(listed[p]).max() == pytest.approx(1e-2) for p in biases)
