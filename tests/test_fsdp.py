"""FSDP and tensor axes: parameters, gradients and optimizer state split over `fsdp` (rule
`sharding.embed`) and heads/MLP widths over `tensor`, XLA gathering per layer. A training step on
8 simulated devices equals the single-device step, and each device holds its share."""

import jax
import numpy as np
import optax
import pytest

from moe_jax import parallel
from tests.mesh_steps import train_on_mesh

MESHES = {   # (data, fsdp, tensor, expert), expert parallelism on when expert > 1
    "fsdp 8": (1, 8, 1, 1),
    "data 2 x fsdp 4": (2, 4, 1, 1),
    "fsdp 2 x expert 4, all_to_all": (1, 2, 1, 4),
    "data 2 x tensor 2 x expert 2, all_to_all": (2, 1, 2, 2),
    "fsdp 4 x expert 2, all_to_all, scanned layers": (1, 4, 1, 2),
}

SGD = optax.sgd(0.1)   # one object, so that equal steps (the one-device reference) are reused


def _config(tiny_config, expert_parallel: bool):
  tiny_config.model.num_kv_heads = 2   # key/value heads that split over tensor = 2
  tiny_config.dispatch.capacity_factor = 8.0   # nothing drops: per-device groups compute alike
  if expert_parallel:
    tiny_config.dispatch.expert_parallel = "all_to_all"
  return tiny_config


def _train(config, sizes, batches, tx=None, zero1: bool = False):
  """(state after the steps, losses) on a mesh of `sizes` with the config's sharding rules."""
  data, fsdp, tensor, expert = sizes
  mesh = parallel.make_mesh(data, expert, jax.devices()[:data * fsdp * tensor * expert],
                            fsdp=fsdp, tensor=tensor)
  return train_on_mesh(config, mesh, batches, parallel.parse_rules(config.sharding), tx, zero1)


@pytest.fixture(scope="module")
def batches():
  return [np.random.default_rng(i).integers(0, 256, (8, 33), dtype=np.int32) for i in range(1)]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_a_step_on_the_mesh_equals_the_single_device_step(tiny_config, batches, mesh):
  """One step with plain SGD (lr 0.1: a parameter moves by 0.1 x its gradient, where Adam's
  normalisation would blow a near-zero gradient's float32 noise up to a share of the learning
  rate): loss within 2e-5 relative; parameters and balancing biases within 2e-5 relative +
  1e-6 (float32 sums in another order)."""
  sizes = MESHES[mesh]
  config = _config(tiny_config, expert_parallel=sizes[3] > 1)
  config.model.scan_layers = "scanned" in mesh   # stacked parameters: a leading layer axis
  sharded, sharded_losses = _train(config, sizes, batches, SGD)
  single, losses = _train(config, (1, 1, 1, 1), batches, SGD)
  np.testing.assert_allclose(sharded_losses, losses, rtol=2e-5)
  used = {axis for leaf in jax.tree.leaves(sharded.params) for axes in leaf.sharding.spec
          if axes for axis in ((axes,) if isinstance(axes, str) else axes)}
  split = {axis for axis, size in zip(("fsdp", "tensor", "expert"), sizes[1:]) if size > 1}
  assert split <= used, (split, used)   # parameters really are split over each such axis
  for a, b in zip(jax.tree.leaves((sharded.params, sharded.biases)),
                  jax.tree.leaves((single.params, single.biases))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def _device_bytes(tree, device) -> int:
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


@pytest.mark.parametrize("mesh, share", [("fsdp 8", 8), ("data 2 x fsdp 4", 4)])
def test_each_device_holds_its_share_of_parameters_and_optimizer_state(tiny_config, batches,
                                                                      mesh, share):
  """Every parameter of the tiny model has a model-width dimension, so over fsdp = N each
  device holds exactly 1/N of the parameters and of the Adam moments (plus Adam's step
  counters, which stay whole)."""
  state, _ = _train(_config(tiny_config, expert_parallel=False), MESHES[mesh], batches)
  device = jax.devices()[0]
  total = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  assert _device_bytes(state.params, device) * share == total(state.params)
  counters = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 0)
  moments = total(state.opt_state) - counters
  assert _device_bytes(state.opt_state, device) == moments // share + counters


def test_zero1_splits_the_moments_over_data_on_top_of_fsdp_and_adam_steps_alike(tiny_config,
                                                                               batches):
  """data 2 x fsdp 4 with ZeRO-1: each device holds 1/4 of the parameters and 1/8 of the Adam
  moments; two AdamW steps (lr 1e-2) give the losses (2e-5 relative) and parameters (1e-4
  relative + 1e-5, a thousandth of a step) of one device. Adam's epsilon is 1e-3 here: with
  the usual 1e-8 an element whose gradient is float32 noise (a token the batch never holds)
  moves by up to a whole step in either direction, and elements 1.9e-4 apart were seen."""
  config = _config(tiny_config, expert_parallel=False)
  two = batches * 2
  adam = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1)
  state, losses = _train(config, MESHES["data 2 x fsdp 4"], two, adam, zero1=True)
  single, single_losses = _train(config, (1, 1, 1, 1), two, adam)
  device = jax.devices()[0]
  total = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  assert _device_bytes(state.params, device) * 4 == total(state.params)
  counters = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 0)
  assert _device_bytes(state.opt_state, device) == (total(state.opt_state) - counters) // 8 + counters
  np.testing.assert_allclose(losses, single_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
