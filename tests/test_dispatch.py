"""Dispatchers against the loop-over-experts reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.dispatch.base import group_sizes, masked_gather, take_rows
from moe_jax.dispatch import (DISPATCHERS, SwiGLUExperts, capacity_dispatch, dense_dispatch,
                              expert_capacity, expert_choice_dispatch, reference_dispatch)

T, D, F, E, K = 48, 16, 8, 6, 2


def _problem(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (T, D))
  weights = (jax.random.normal(keys[1], (E, D, F)) / 4, jax.random.normal(keys[2], (E, D, F)) / 4,
             jax.random.normal(keys[3], (E, F, D)) / 3)
  decision = routing.topk_route(jax.random.normal(keys[4], (T, E)) * 2, None, top_k=K,
                                score_function="softmax")
  return x, weights, decision


def _run(dispatch, x, weights, decision, capacity_factor):
  return dispatch(x, decision.expert_ids, decision.gates, SwiGLUExperts(*weights), capacity_factor)


# Every dispatcher but the reference itself (comparing it with itself could not fail).
FAST = {name: DISPATCHERS[name] for name in sorted(set(DISPATCHERS) - {"reference"})}
FAST["dropless, gates before down"] = functools.partial(DISPATCHERS["dropless"],
                                                        gates_before_down=True)
FAST_PATHS = list(FAST)


@pytest.mark.parametrize("name", FAST_PATHS)
def test_matches_reference_when_nothing_is_dropped(name):
  x, weights, decision = _problem()
  no_drop = E / K                                     # capacity = T: every token fits
  expected = _run(reference_dispatch, x, weights, decision, None)
  got = jax.jit(lambda x, w: _run(FAST[name], x, w, decision, no_drop))(x, weights)
  np.testing.assert_allclose(got.output, expected.output, rtol=1e-5, atol=1e-5)
  assert float(got.dropped) == 0.0


@pytest.mark.parametrize("name", FAST_PATHS)
def test_gradients_match_reference(name):
  """Of the tokens, the expert weights and the gates (dropless with gates_before_down scales the
  experts' activations by the gates, the others their outputs)."""
  x, weights, decision = _problem(1)
  loss = lambda dispatch, factor: lambda x, w, gates: jnp.sum(_run(
      dispatch, x, w, decision._replace(gates=gates), factor).output ** 2)
  inputs = (x, weights, decision.gates)
  expected = jax.grad(loss(reference_dispatch, None), argnums=(0, 1, 2))(*inputs)
  got = jax.grad(loss(FAST[name], E / K), argnums=(0, 1, 2))(*inputs)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


class IdentityExperts:
  """Two experts that return their input, so outputs show exactly which tokens were kept."""
  num_experts = 2

  def __call__(self, buffer):
    return buffer


def test_capacity_drops_lowest_gates_first_and_counts_them():
  x = jnp.eye(4, 3)[:, :3] + 1.0                       # 4 distinct tokens, D=3
  ids = jnp.zeros((4, 1), jnp.int32)                     # all to expert 0 of 2
  gates = jnp.array([[0.1], [0.9], [0.5], [0.3]])
  assert expert_capacity(4, 1, 2, 1.0) == 2
  out = capacity_dispatch(x, ids, gates, IdentityExperts(), 1.0)
  np.testing.assert_allclose(out.output[1], 0.9 * x[1], rtol=1e-6)
  np.testing.assert_allclose(out.output[2], 0.5 * x[2], rtol=1e-6)
  np.testing.assert_array_equal(out.output[0], 0.0)
  np.testing.assert_array_equal(out.output[3], 0.0)
  assert float(out.dropped) == 2.0


@pytest.mark.parametrize("dispatch", [capacity_dispatch, dense_dispatch])
def test_drop_counts_when_capacity_is_exceeded(dispatch):
  x, weights, decision = _problem(2)
  got = _run(dispatch, x, weights, decision, 0.5)
  capacity = expert_capacity(T, K, E, 0.5)
  counts = np.asarray(routing.expert_counts(decision.expert_ids, E))
  assert float(got.dropped) == np.maximum(counts - capacity, 0).sum() > 0


def test_capacity_keeps_highest_gates_and_matches_reference_on_kept_tokens():
  x, weights, decision = _problem(2)
  got = _run(capacity_dispatch, x, weights, decision, 0.5)
  capacity = expert_capacity(T, K, E, 0.5)
  # A token all of whose experts kept it must match the reference exactly.
  ref = _run(reference_dispatch, x, weights, decision, None)
  kept_all = _kept_assignments(np.asarray(decision.expert_ids), np.asarray(decision.gates),
                               capacity).all(axis=1)
  np.testing.assert_allclose(np.asarray(got.output)[kept_all], np.asarray(ref.output)[kept_all],
                             rtol=1e-5, atol=1e-5)


def _kept_assignments(ids, gates, capacity):
  """Slow restatement of the drop rule: per expert, keep the `capacity` highest gates."""
  kept = np.zeros(ids.shape, bool)
  for e in range(E):
    slots = [(-gates[t, k], t * K + k) for t in range(T) for k in range(K) if ids[t, k] == e]
    for _, flat in sorted(slots)[:capacity]:
      kept[flat // K, flat % K] = True
  return kept


def test_capacity_with_drops_equals_reference_without_the_dropped_and_so_do_gradients():
  x, weights, decision = _problem(3)
  capacity = expert_capacity(T, K, E, 0.5)
  kept = _kept_assignments(np.asarray(decision.expert_ids), np.asarray(decision.gates), capacity)
  assert 0 < kept.sum() < kept.size
  only_kept = decision._replace(gates=decision.gates * kept)
  loss = lambda dispatch, decision, factor: lambda x, w: jnp.sum(
      _run(dispatch, x, w, decision, factor).output ** 2)
  np.testing.assert_allclose(loss(capacity_dispatch, decision, 0.5)(x, weights),
                             loss(reference_dispatch, only_kept, None)(x, weights), rtol=1e-5)
  got = jax.jit(jax.grad(loss(capacity_dispatch, decision, 0.5), argnums=(0, 1)))(x, weights)
  expected = jax.grad(loss(reference_dispatch, only_kept, None), argnums=(0, 1))(x, weights)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, width", [(jnp.bfloat16, 6), (jnp.float16, 8), (jnp.bfloat16, 5),
                                          (jnp.float32, 4)])
def test_take_rows_equals_plain_indexing_bit_for_bit(dtype, width):
  """16-bit rows of even width travel as 32-bit words; the others by plain indexing."""
  bits = jax.random.bits(jax.random.key(0), (7, width), jnp.uint32 if dtype == jnp.float32
                         else jnp.uint16)
  rows = jax.lax.bitcast_convert_type(bits, dtype)   # every bit pattern, NaNs included
  index = jnp.array([6, 0, 3, 3, 1, 6, 2, 5, 4, 0])
  got = jax.jit(take_rows)(rows, index)
  assert got.dtype == rows.dtype and got.shape == (10, width)
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, bits.dtype), bits[index])


def test_group_sizes_count_each_group_and_ignore_ids_past_the_last():
  ids = jnp.array([2, 0, 2, 5, 1, 2, 4], jnp.int32)
  np.testing.assert_array_equal(group_sizes(ids, 4), [1, 1, 3, 0])
  assert group_sizes(ids, 4).dtype == jnp.int32


def test_masked_gather_gradient_equals_the_scatter_add_of_plain_indexing():
  rows = jax.random.normal(jax.random.key(0), (5, 3))
  # Rows 0..4, each read twice (multiplicity 2) at shuffled places; rows 1 and 3 once masked.
  reads = np.array([3, 0, 4, 1, 2, 0, 1, 4, 2, 3])
  valid = np.ones(10, bool)
  valid[[6, 9]] = False                         # one read of row 1 and one of row 3
  back_index = np.argsort(reads, kind="stable")  # row r's reads at back_index[2r], [2r + 1]
  back_valid = valid[back_index]
  cotangent = jax.random.normal(jax.random.key(1), (10, 3))
  fast = lambda r: jnp.sum(masked_gather(r, reads, valid, back_index, back_valid, 2) * cotangent)
  plain = lambda r: jnp.sum(jnp.where(valid[:, None], r[reads], 0) * cotangent)
  np.testing.assert_allclose(fast(rows), plain(rows), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(fast)(rows), jax.grad(plain)(rows), rtol=1e-6, atol=1e-6)


def test_expert_choice_dispatch_matches_reference():
  x, weights, _ = _problem(3)
  logits = jax.random.normal(jax.random.key(9), (T, E))
  decision = routing.expert_choice_route(logits, capacity=10)
  experts = SwiGLUExperts(*weights)
  got = expert_choice_dispatch(x, decision.token_ids, decision.gates, experts)
  # The same assignment written token-centrically: every token "chooses" all E experts,
  # with the gate of those that took it and 0 elsewhere.
  weight_TxE = jnp.zeros((T, E)).at[decision.token_ids, jnp.arange(E)[:, None]].add(decision.gates)
  expected = reference_dispatch(x, jnp.tile(jnp.arange(E), (T, 1)), weight_TxE, experts)
  np.testing.assert_allclose(got, expected.output, rtol=1e-5, atol=1e-5)
