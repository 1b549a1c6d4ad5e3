"""Routing formulas against hand-worked values, and properties of the balancing bias."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing

# sigmoid(0, ln 3, -ln 3, ln 9) = (0.5, 0.75, 0.25, 0.9)
LOGITS = jnp.array([[0.0, math.log(3), -math.log(3), math.log(9)]])


def test_sigmoid_router_picks_top_scores_and_normalises_gates():
  r = routing.topk_route(LOGITS, None, top_k=2)
  np.testing.assert_array_equal(r.expert_ids, [[3, 1]])
  np.testing.assert_allclose(r.gates, [[0.9 / 1.65, 0.75 / 1.65]], rtol=1e-6)
  np.testing.assert_allclose(r.probs, [[0.5, 0.75, 0.25, 0.9]], rtol=1e-6)


def test_top_k_indices_break_ties_to_the_lower_column_and_skip_masked_ones():
  scores = jnp.array([[0.5, 0.9, 0.5, 0.9, -jnp.inf, 0.1],
                      [-jnp.inf, 0.2, 0.2, 0.2, 0.3, -jnp.inf]])
  np.testing.assert_array_equal(routing.top_k_indices(scores, 4), [[1, 3, 0, 2], [4, 1, 2, 3]])


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_indices_equal_lax_top_k(k):
  """Few distinct values (many ties), masked columns, two leading dimensions."""
  key_values, key_mask = jax.random.split(jax.random.key(k))
  scores = jax.random.randint(key_values, (3, 40, 16), 0, 4).astype(jnp.float32) / 4
  scores = jnp.where(jax.random.bernoulli(key_mask, 0.3, scores.shape), -jnp.inf, scores)
  scores = scores.at[..., :k].set(jnp.maximum(scores[..., :k], 0))   # k finite per row
  np.testing.assert_array_equal(routing.top_k_indices(scores, k), jax.lax.top_k(scores, k)[1])


def test_bias_changes_the_choice_but_gates_come_from_unbiased_scores():
  bias = jnp.array([0.0, 0.0, 1.0, 0.0])   # biased scores: 0.5, 0.75, 1.25, 0.9
  r = routing.topk_route(LOGITS, bias, top_k=2, route_scale=2.5)
  np.testing.assert_array_equal(r.expert_ids, [[2, 3]])
  np.testing.assert_allclose(r.gates, [[2.5 * 0.25 / 1.15, 2.5 * 0.9 / 1.15]], rtol=1e-6)


def test_sigmoid_router_without_normalisation_keeps_raw_scores():
  r = routing.topk_route(LOGITS, None, top_k=2, route_scale=2.0, norm_topk_prob=False)
  np.testing.assert_allclose(r.gates, [[1.8, 1.5]], rtol=1e-6)


def test_softmax_router_follows_deepseek_v2():
  logits = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0]]))    # probs 0.1, 0.2, 0.3, 0.4
  r = routing.topk_route(logits, None, top_k=2, score_function="softmax", norm_topk_prob=False,
                         route_scale=2.0)
  np.testing.assert_array_equal(r.expert_ids, [[3, 2]])
  np.testing.assert_allclose(r.gates, [[0.8, 0.6]], rtol=1e-6)
  r = routing.topk_route(logits, None, top_k=2, score_function="softmax", norm_topk_prob=True)
  np.testing.assert_allclose(r.gates, [[4 / 7, 3 / 7]], rtol=1e-6)


@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_sigmoid_gates_sum_to_route_scale(route_scale):
  logits = jax.random.normal(jax.random.key(0), (32, 16))
  bias = jax.random.normal(jax.random.key(1), (16,))
  r = routing.topk_route(logits, bias, top_k=4, route_scale=route_scale)
  np.testing.assert_allclose(r.gates.sum(-1), route_scale, rtol=1e-5)


def test_bias_never_changes_gate_values_and_gets_zero_gradient():
  logits = jax.random.normal(jax.random.key(2), (64, 8))
  for seed in range(3):
    bias = 3 * jax.random.normal(jax.random.key(seed), (8,))
    r = routing.topk_route(logits, bias, top_k=2)
    unbiased = jax.nn.sigmoid(logits)
    chosen = jnp.take_along_axis(unbiased, r.expert_ids, -1)
    np.testing.assert_allclose(r.gates, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  grad = jax.grad(lambda b: jnp.sum(routing.topk_route(logits, b, top_k=2).gates ** 2))(bias)
  np.testing.assert_array_equal(grad, np.zeros(8))


def test_group_limited_routing_v3_scores_groups_by_top2_sum():
  # 6 experts in 3 groups of 2; biased scores (V3 sums the two best of each group).
  probs = jnp.array([[0.9, 0.1, 0.6, 0.5, 0.7, 0.0]])   # group sums 1.0, 1.1, 0.7
  logits = jnp.log(probs / (1 - probs + 1e-12) + 1e-12)  # sigmoid^-1
  r = routing.topk_route(logits, None, top_k=2, num_groups=3, topk_groups=1)
  np.testing.assert_array_equal(r.expert_ids, [[2, 3]])     # best expert 0 is outside the group
  r = routing.topk_route(logits, None, top_k=2, num_groups=3, topk_groups=2)
  np.testing.assert_array_equal(r.expert_ids, [[0, 2]])


def test_group_limited_routing_v2_scores_groups_by_max():
  probs = jnp.array([[0.9, 0.1, 0.6, 0.5, 0.7, 0.0]])   # group maxima 0.9, 0.6, 0.7
  logits = jnp.log(probs + 1e-12)                          # softmax keeps the ratios (sum 2.8)
  r = routing.topk_route(logits, None, top_k=2, score_function="softmax", num_groups=3,
                         topk_groups=2, group_score="max", norm_topk_prob=False)
  np.testing.assert_array_equal(r.expert_ids, [[0, 4]])
  np.testing.assert_allclose(r.gates, [[0.9 / 2.8, 0.7 / 2.8]], rtol=1e-5)


def test_group_masking_survives_a_large_negative_bias():
  logits = jax.random.normal(jax.random.key(3), (16, 8))
  huge_negative = jnp.full((8,), -1e6)
  masked = routing.group_limited_mask(jax.nn.sigmoid(logits) + huge_negative,
                                      jax.nn.sigmoid(logits), 4, 1, "top2_sum")
  r = routing.topk_route(logits, huge_negative, top_k=2, num_groups=4, topk_groups=1)
  groups = np.asarray(r.expert_ids) // 2
  assert (groups[:, 0] == groups[:, 1]).all()                     # both from the one kept group
  kept = np.isfinite(np.asarray(masked))
  assert (kept.sum(-1) == 2).all()
  assert kept[np.arange(16)[:, None], np.asarray(r.expert_ids)].all()


def test_expert_choice_takes_each_experts_top_tokens():
  logits = jnp.log(jnp.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]))
  r = routing.expert_choice_route(logits, capacity=2)
  np.testing.assert_array_equal(r.token_ids, [[0, 2], [1, 2]])
  np.testing.assert_allclose(r.gates, [[0.7, 0.6], [0.8, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(r.counts, [2, 2])


def test_expert_counts():
  np.testing.assert_array_equal(routing.expert_counts(jnp.array([[0, 1], [1, 2]]), 4), [1, 2, 1, 0])


# ---- balancing --------------------------------------------------------------------------------


def test_switch_loss_equals_alpha_at_uniform_routing():
  probs = jnp.full((12, 4), 0.25)
  np.testing.assert_allclose(routing.switch_loss(probs, jnp.full((4,), 6.0), alpha=0.01), 0.01,
                             rtol=1e-6)


def test_switch_loss_hand_values():
  probs = jnp.array([[0.8, 0.2], [0.4, 0.6]])          # mean P = (0.6, 0.4)
  # f = (1, 0): 1.0 * 2 * 0.6 = 1.2 ; f = (0.5, 0.5): 1.0
  np.testing.assert_allclose(routing.switch_loss(probs, jnp.array([2.0, 0.0]), 1.0), 1.2, rtol=1e-6)
  np.testing.assert_allclose(routing.switch_loss(probs, jnp.array([1.0, 1.0]), 1.0), 1.0, rtol=1e-6)
  grad_counts = jax.grad(lambda c: routing.switch_loss(probs, c, 1.0))(jnp.array([1.0, 1.0]))
  np.testing.assert_array_equal(grad_counts, [0.0, 0.0])


def test_sequence_loss_equals_alpha_at_uniform_routing():
  # 2 sequences of 4 tokens, E=4, K=2, every expert chosen by 2 tokens per sequence.
  probs = jnp.full((2, 4, 4), 0.3)                     # unnormalised sigmoid scores, all equal
  counts = jnp.full((2, 4), 2.0)
  np.testing.assert_allclose(routing.sequence_balance_loss(probs, counts, 2, alpha=1e-4), 1e-4,
                             rtol=1e-6)


def test_sequence_loss_hand_value():
  # One sequence of 2 tokens, E=2, K=1; both tokens choose expert 0: f = (2, 0).
  probs = jnp.array([[[0.6, 0.2], [0.3, 0.3]]])        # normalised: (0.75, 0.25), (0.5, 0.5)
  loss = routing.sequence_balance_loss(probs, jnp.array([[2.0, 0.0]]), 1, alpha=1.0)
  np.testing.assert_allclose(loss, 2 * 0.625, rtol=1e-6)  # f_0 * P_0 = 2 * mean(0.75, 0.5)


def test_z_loss_at_zero_logits():
  np.testing.assert_allclose(routing.z_loss(jnp.zeros((5, 8)), 1.0), math.log(8) ** 2, rtol=1e-6)
  np.testing.assert_allclose(routing.z_loss(jnp.zeros((5, 8)), 1e-3), 1e-3 * math.log(8) ** 2,
                             rtol=1e-6)


def test_bias_update_rules():
  counts = jnp.array([4.0, 0.0, 2.0, 2.0])               # mean 2; relative load 2, 0, 1, 1
  np.testing.assert_allclose(routing.update_balancing_bias(jnp.zeros(4), counts, 0.1, "sign"),
                             [-0.1, 0.1, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(routing.update_balancing_bias(jnp.ones(4), counts, 0.1, "proportional"),
                             [0.9, 1.1, 1.0, 1.0], rtol=1e-6)


# ---- statistics --------------------------------------------------------------------------------


def test_max_violation_when_k_experts_take_every_token():
  E, K, T = 16, 4, 100
  counts = jnp.zeros(E).at[:K].set(T)
  np.testing.assert_allclose(routing.max_violation(counts), E / K - 1, rtol=1e-6)
  assert float(routing.max_violation(jnp.full((8,), 3.0))) == 0.0


def test_entropy_confidence_dead_experts_coactivation():
  np.testing.assert_allclose(routing.router_entropy(jnp.full((3, 4), 0.25)), math.log(4), rtol=1e-6)
  np.testing.assert_allclose(routing.router_entropy(jnp.array([[1.0, 0.0]])), 0.0, atol=1e-6)
  np.testing.assert_allclose(routing.routing_confidence(jnp.full((4,), 5.0)), math.log(4), rtol=1e-6)
  np.testing.assert_allclose(routing.routing_confidence(jnp.array([3.0, 1.0])),
                             -(math.log(0.75) + math.log(0.25)) / 2, rtol=1e-6)
  assert float(routing.dead_experts(jnp.array([3.0, 0.0, 1.0, 0.0]))) == 2
  coact = routing.coactivation(routing.chosen_mask(jnp.array([[0, 1], [1, 2], [0, 1]]), 3))
  np.testing.assert_array_equal(coact, [[2, 2, 0], [2, 3, 1], [0, 1, 1]])


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), skew=st.floats(0.5, 3.0),
                  rule=st.sampled_from(routing.BIAS_RULES))
def test_repeated_bias_updates_balance_a_skewed_router(seed, skew, rule):
  """A router that prefers low-numbered experts gets balanced by the bias alone."""
  E, K, T = 8, 2, 512
  logits = jax.random.normal(jax.random.key(seed), (T, E)) - skew * jnp.linspace(-1, 1, E)
  bias = jnp.zeros(E)
  route = jax.jit(lambda b: routing.topk_route(logits, b, top_k=K).counts)
  start = float(routing.max_violation(route(bias)))
  rate = 0.01 if rule == "sign" else 0.05
  for _ in range(300):
    bias = routing.update_balancing_bias(bias, route(bias), rate, rule)
  end = float(routing.max_violation(route(bias)))
  assert start > 0.5 and end < 0.5 * start and end < 0.35


def test_relative_load_is_each_layers_counts_over_their_mean():
  from moe_jax.metrics import relative_load as on_host
  counts = np.array([[1, 3, 0, 4], [2, 2, 2, 2], [0, 0, 0, 0]])
  expected = np.array([[0.5, 1.5, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(routing.relative_load(jnp.asarray(counts)), expected)
  np.testing.assert_allclose(routing.relative_load(jnp.asarray(counts[0])), expected[0])
  np.testing.assert_allclose(on_host(counts), expected)


def test_validation_max_violation_per_layer_their_mean_and_the_worst_by_hand():
  from moe_jax import steps
  # Expert counts summed over the evaluated batches: layer 0 [3, 1] (MaxVio 3/2 - 1 = 0.5),
  # layer 1 [2, 2] (0), layer 2 [0, 4] (4/2 - 1 = 1).
  sums = {"nats": np.float32(6.0), "targets": np.float32(3.0),
          "counts": np.array([[3, 1], [2, 2], [0, 4]], np.float32)}
  summary = steps.summarize_evaluation(sums)
  assert summary["validation_loss"] == 2.0
  assert [summary[f"validation_max_violation/layer{i}"] for i in range(3)] == [0.5, 0.0, 1.0]
  assert summary["validation_max_violation"] == 1.0
  assert summary["validation_max_violation_mean"] == 0.5


def test_validation_max_violation_per_batch_is_the_mean_of_each_batchs_not_the_summed_counts():
  """Two validation batches through train.evaluate: MaxVio_batch averages each batch's MaxVio
  (mean over layers), computed here with numpy from each batch's own counts; MaxVio_global
  is taken of the summed counts, so the two differ."""
  from configs.default import get_config
  from moe_jax import data, parallel, steps, train
  from moe_jax.model import ModelSpec
  config = get_config("tiny")
  spec = ModelSpec.from_config(config)
  tx = steps.make_optimizer(steps.make_schedule(1e-3, 1, 10, 0.1), 0.9, 0.95, 0.0, 1.0)
  graphdef, state = steps.init_state(spec, tx, 0)
  rng = np.random.default_rng(0)
  windows = data.Windows(rng.integers(1, 256, 2 * 8 * 16 + 1).astype(np.int32), 16, "validation")
  eval_fn = jax.jit(lambda s, t: steps.eval_step(s, t, graphdef=graphdef))
  mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
  summary, counts = train.evaluate(eval_fn, state, windows, 2, 8, mesh, parallel.BATCH_AXES)

  def max_violation(c):   # per layer: (max - mean) / mean
    c = np.asarray(c, np.float64)
    return (c.max(-1) - c.mean(-1)) / c.mean(-1)

  per_batch = [max_violation(eval_fn(state, np.stack([windows[8 * b + i] for i in range(8)]))
                             ["counts"]).mean() for b in range(2)]
  assert summary["validation_max_violation_batch"] == pytest.approx(np.mean(per_batch), rel=1e-5)
  assert summary["validation_max_violation_mean"] == pytest.approx(
      max_violation(counts).mean(), rel=1e-5)
  assert summary["validation_max_violation_batch"] > summary["validation_max_violation_mean"]
