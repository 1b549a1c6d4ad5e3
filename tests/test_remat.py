"""Activation checkpointing (`model.remat`): every policy computes the same loss and gradients
as keeping everything, and keeps less for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from moe_jax import steps
from moe_jax.dispatch.base import gather_assignments, inverse_permutation
from moe_jax.model import REMAT_POLICIES, ModelSpec


def _loss_and_grads(spec: ModelSpec):
  """(jitted (params, tokens) -> (loss, gradients), initial params)."""
  graphdef, state = steps.init_state(spec, steps.make_optimizer(1e-3, 0.9, 0.95, 0.0, 1.0), 0)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, tokens: steps.loss_fn(p, state.biases, graphdef, tokens, 0.3)[0]))
  return grad_fn, state.params


def _spec(remat: str) -> ModelSpec:
  spec = ModelSpec.from_config(get_config("tiny"))
  return spec.replace(remat=remat, mtp_depth=1)   # the MTP block is recomputed too


@pytest.fixture(scope="module")
def without_remat():
  """(tokens, params, loss and gradients keeping everything)."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 33)), jnp.int32)
  grad_fn, params = _loss_and_grads(_spec("none"))
  return tokens, params, grad_fn(params, tokens)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_losses_and_gradients_of_no_remat(without_remat, policy):
  tokens, params, want = without_remat
  got_fn, _ = _loss_and_grads(_spec(policy))
  got = got_fn(params, tokens)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _residual_bytes(spec: ModelSpec, tokens) -> int:
  """Bytes the forward pass keeps for the backward pass (the residuals of the gradient)."""
  graphdef, state = steps.init_state(spec, steps.make_optimizer(1e-3, 0.9, 0.95, 0.0, 1.0), 0)
  loss = lambda p: steps.loss_fn(p, state.biases, graphdef, tokens, 0.3)[0]
  kept = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), state.params)
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in kept)


def test_each_policy_keeps_less_for_the_backward_pass():
  """Kept for backward, 4 blocks, 32 x 128 tokens: everything 164 MB; the block inputs only
  12.7 MB; matmul outputs 33 MB; the experts' inputs and outputs 28 MB; all but cheap results
  71 MB (on CPU attention's scores are matmul outputs) (measured, jax 0.10.2)."""
  tokens = jnp.zeros((32, 129), jnp.int32)
  kept = {p: _residual_bytes(_spec(p).replace(num_layers=4, mtp_depth=0), tokens)
          for p in REMAT_POLICIES}
  assert kept["block"] < 0.1 * kept["none"], kept
  for policy in ("matmuls", "expert_io"):
    assert kept["block"] < kept[policy] < 0.25 * kept["none"], kept
  assert kept["matmuls"] < kept["costly"] < 0.5 * kept["none"], kept


def test_costly_keeps_matmuls_sorts_and_scatters_and_recomputes_gathers_casts_and_arithmetic():
  def f(x, w):
    h = x @ w                                           # a matmul: kept, f32[8, 6]
    order = jnp.argsort(jnp.concatenate([h[:, 0], h[:, 1]]))   # a sort: kept, i32[16]
    inverse = inverse_permutation(order)                # a scatter: kept, i32[16]
    rows = gather_assignments(h, order, inverse, 2)     # a gather (own gradient): [16, 6]
    return jnp.sum(jnp.tanh(rows.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

  x, w = jnp.ones((8, 4)), jnp.ones((4, 6))
  policy = jax.checkpoint(f, policy=REMAT_POLICIES["costly"])
  kept = jax.eval_shape(lambda x, w: jax.tree.leaves(jax.vjp(policy, x, w)[1]), x, w)
  assert sorted((str(r.dtype), r.shape) for r in kept) == [
      ("float32", (4, 6)), ("float32", (8, 4)),       # the arguments, w and x
      ("float32", (8, 6)), ("int32", (16,)), ("int32", (16,))]
