"""Routing formulas against hand-worked values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing

# sigmoid(0, ln 3, -ln 3, ln 9) = (0.5, 0.75, 0.25, 0.9)
LOGITS = jnp.array([[0.0, math.log(3), -math.log(3), math.log(9)]])


def test_sigmoid_router_picks_top_scores_and_normalises_gates():
  r = routing.sigmoid_topk(LOGITS, None, top_k=2, route_scale=1.0, normalize=True)
  np.testing.assert_array_equal(r.expert_ids, [[3, 1]])
  np.testing.assert_allclose(r.gates, [[0.9 / 1.65, 0.75 / 1.65]], rtol=1e-6)
  np.testing.assert_allclose(r.probs, [[0.5, 0.75, 0.25, 0.9]], rtol=1e-6)


def test_bias_changes_the_choice_but_gates_come_from_unbiased_scores():
  bias = jnp.array([0.0, 0.0, 1.0, 0.0])   # biased scores: 0.5, 0.75, 1.25, 0.9
  r = routing.sigmoid_topk(LOGITS, bias, top_k=2, route_scale=2.5, normalize=True)
  np.testing.assert_array_equal(r.expert_ids, [[2, 3]])
  np.testing.assert_allclose(r.gates, [[2.5 * 0.25 / 1.15, 2.5 * 0.9 / 1.15]], rtol=1e-6)


def test_sigmoid_router_without_normalisation_keeps_raw_scores():
  r = routing.sigmoid_topk(LOGITS, None, top_k=2, route_scale=2.0, normalize=False)
  np.testing.assert_allclose(r.gates, [[1.8, 1.5]], rtol=1e-6)


def test_softmax_router():
  logits = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0]]))    # probs 0.1, 0.2, 0.3, 0.4
  r = routing.softmax_topk(logits, None, top_k=2)
  np.testing.assert_array_equal(r.expert_ids, [[3, 2]])
  np.testing.assert_allclose(r.gates, [[0.4, 0.3]], rtol=1e-6)
  r = routing.softmax_topk(logits, None, top_k=2, normalize=True)
  np.testing.assert_allclose(r.gates, [[4 / 7, 3 / 7]], rtol=1e-6)


def test_expert_counts():
  counts = routing.expert_counts(jnp.array([[0, 1], [1, 2]]), 4)
  np.testing.assert_array_equal(counts, [1, 2, 1, 0])


def test_switch_aux_loss_hand_values():
  probs = jnp.array([[0.8, 0.2], [0.4, 0.6]])          # mean P = (0.6, 0.4)
  # f = (0.5, 0.5): 2 * (0.5 * 0.6 + 0.5 * 0.4) = 1.0
  np.testing.assert_allclose(routing.switch_aux_loss(probs, jnp.array([1.0, 1.0])), 1.0, rtol=1e-6)
  # f = (1, 0): 2 * 0.6 = 1.2
  np.testing.assert_allclose(routing.switch_aux_loss(probs, jnp.array([2.0, 0.0])), 1.2, rtol=1e-6)


def test_switch_aux_loss_gradient_flows_only_through_probabilities():
  probs = jnp.array([[0.8, 0.2], [0.4, 0.6]])
  grad_counts = jax.grad(lambda c: routing.switch_aux_loss(probs, c))(jnp.array([1.0, 1.0]))
  np.testing.assert_array_equal(grad_counts, [0.0, 0.0])
  grad_probs = jax.grad(lambda p: routing.switch_aux_loss(p, jnp.array([2.0, 0.0])))(probs)
  assert np.abs(np.asarray(grad_probs)).sum() > 0


def test_bias_update_sign_rule():
  counts = jnp.array([4.0, 0.0, 2.0, 2.0])               # mean 2
  bias = routing.update_balancing_bias(jnp.zeros(4), counts, rate=0.1)
  np.testing.assert_allclose(bias, [-0.1, 0.1, 0.0, 0.0], rtol=1e-6)


def test_max_violation():
  assert float(routing.max_violation(jnp.array([4.0, 0.0, 2.0, 2.0]))) == pytest.approx(1.0)
  assert float(routing.max_violation(jnp.array([3.0, 3.0, 3.0]))) == pytest.approx(0.0)


@pytest.mark.parametrize("router", sorted(routing.ROUTERS))
def test_router_invariants_on_random_logits(router):
  logits = jax.random.normal(jax.random.key(0), (64, 16))
  bias = jax.random.normal(jax.random.key(1), (16,))
  r = routing.ROUTERS[router](logits, bias, 4, 1.0, True)
  ids = np.asarray(r.expert_ids)
  assert all(len(set(row)) == 4 for row in ids)                   # distinct experts
  np.testing.assert_allclose(np.asarray(r.gates).sum(-1), 1.0, rtol=1e-5)
  biased = np.asarray(r.probs) + np.asarray(bias)
  chosen_min = np.take_along_axis(biased, ids, -1).min(-1)
  masked = biased.copy()
  np.put_along_axis(masked, ids, -np.inf, -1)
  assert (masked.max(-1) <= chosen_min).all()                    # top-k on biased scores
  assert float(r.counts.sum()) == 64 * 4
