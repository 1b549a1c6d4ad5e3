"""Pipelines run from a schedule's slot lists on 8 simulated devices: GPipe, 1F1B and DualPipeV
give the loss and the gradients (parameters, micro-batches) of the stages run one after another,
with stages' auxiliary losses and statistics too; the tick table of a
small 1F1B worked by hand; stages that do not fit the schedule refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.pipeline import schedules
from moe_jax.pipeline.scheduled import (FORWARD, FULL_BACKWARD, IDLE, lockstep_bubble, scheduled,
                                        tick_table)

B, D = 8, 16


def _stage(params, h):
  return jnp.tanh(h @ params["w"] + params["b"])


def _loss(head, y, targets):
  """The last stage's loss through parameters of its own (an output head's)."""
  return jnp.sum((y @ head - targets) ** 2)


def test_a_two_stage_1f1b_tick_table_worked_by_hand():
  # Lane 0 (forwards), device 0: F0 F1 F2 . .; its backwards wait for device 1's: . . BW0 BW1
  # BW2. Device 1 (the last stage) a tick behind, each backward in its forward's tick.
  table = tick_table(schedules.one_f_one_b(2, 3))
  kinds, microbatches = table.kind, table.microbatch
  F, Bk, _ = FORWARD, FULL_BACKWARD, IDLE
  assert kinds[0].T.tolist() == [[F, F, F, _, _], [_, _, Bk, Bk, Bk]]
  assert kinds[1].T.tolist() == [[_, F, F, F, _], [_, Bk, Bk, Bk, _]]
  assert microbatches[0].T.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 1, 2]]
  assert microbatches[1].T.tolist() == [[0, 0, 1, 2, 0], [0, 0, 1, 2, 0]]
  # A backward twice a forward: the ticks last 1, 3, 3, 3 and 2 units (the slower device's),
  # 12 in all; each device is busy 3 x 1 + 3 x 2 = 9 of them: idle 1 - 18 / 24 = 25%, 1F1B's
  # (S - 1) / (M + S - 1) = 1 / 4.
  assert lockstep_bubble(table, schedules.Costs(1.0, 1.0, 1.0, full_backward=2.0)) == 0.25


CASES = [  # schedule, devices along the stage axis, data shards, micro-batches
    ("gpipe", 4, 2, 3), ("gpipe", 8, 1, 9),
    ("1f1b", 4, 2, 3), ("1f1b", 4, 2, 9), ("1f1b", 8, 1, 3),
    ("dualpipev", 4, 2, 8), ("dualpipev", 4, 2, 11), ("dualpipev", 2, 4, 4),
    ("dualpipev", 8, 1, 16),
]


@pytest.mark.parametrize("name,devices,data,microbatches", CASES)
def test_a_scheduled_pipeline_gives_the_loss_and_gradients_of_the_stages_in_sequence(
    name, devices, data, microbatches):
  stages = devices * (2 if name == "dualpipev" else 1)
  keys = jax.random.split(jax.random.key(stages + microbatches), 4)
  params = {"w": jax.random.normal(keys[0], (stages, D, D)) / 4,
            "b": jax.random.normal(keys[1], (stages, D))}
  x = jax.random.normal(keys[2], (microbatches, B, D))
  targets = jax.random.normal(keys[3], (microbatches, B, D))
  head = jnp.eye(D) + 0.1 * jax.random.normal(jax.random.key(9), (D, D))

  def in_sequence(params, x, head):
    total = 0.0
    for m in range(microbatches):
      h = x[m]
      for s in range(stages):
        h = _stage(jax.tree.map(lambda p: p[s], params), h)
      total = total + _loss(head, h, targets[m])
    return total

  expected_loss, (expected, expected_input, expected_head) = jax.value_and_grad(
      in_sequence, (0, 1, 2))(params, x, head)
  mesh = jax.make_mesh((devices, data), ("stage", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    loss, grads, input_grads, _, head_grad, _ = jax.jit(
        scheduled(name, _stage, _loss, "stage", "data"))(params, x, targets, head)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(input_grads, expected_input, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(head_grad, expected_head, rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _stage_with_aux(params, h):
  """A stage as an MoE stage returns: output, (its auxiliary loss, its statistics)."""
  y = _stage(params, h)
  return y, (0.01 * jnp.sum(y ** 2), {"positive": jnp.sum(y > 0), "total": jnp.sum(y)})


@pytest.mark.parametrize("name", ["1f1b", "dualpipev"])
def test_stage_auxiliary_losses_and_statistics_come_out_of_the_pipeline(name):
  """Each stage's aux loss joins the loss and the gradients; its statistics are summed over
  micro-batches and data shards, per stage."""
  devices, microbatches = 4, 8
  stages = devices * (2 if name == "dualpipev" else 1)
  keys = jax.random.split(jax.random.key(7), 4)
  params = {"w": jax.random.normal(keys[0], (stages, D, D)) / 4,
            "b": jax.random.normal(keys[1], (stages, D))}
  x = jax.random.normal(keys[2], (microbatches, B, D))
  targets = jax.random.normal(keys[3], (microbatches, B, D))

  def in_sequence(params, x):
    total, stats = 0.0, []
    for m in range(microbatches):
      h = x[m]
      for s in range(stages):
        h, (aux, stage_stats) = _stage_with_aux(jax.tree.map(lambda p: p[s], params), h)
        total = total + aux
        stats.append(stage_stats)
      total = total + _loss(jnp.eye(D), h, targets[m])
    per_stage = jax.tree.map(lambda *v: jnp.stack(v).reshape(microbatches, stages).sum(0),
                             *stats)
    return total, per_stage

  (expected_loss, expected_stats), expected = jax.value_and_grad(in_sequence, (0, 1),
                                                                has_aux=True)(params, x)
  mesh = jax.make_mesh((devices, 2), ("stage", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    result = jax.jit(scheduled(name, _stage_with_aux, _loss, "stage", "data", has_aux=True))(
        params, x, targets, jnp.eye(D))
  np.testing.assert_allclose(result.loss, expected_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves((result.grads, result.input_grads)),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(result.stats["positive"], expected_stats["positive"])
  np.testing.assert_allclose(result.stats["total"], expected_stats["total"], rtol=1e-4, atol=1e-3)


def test_stages_that_do_not_fit_the_schedule_are_refused_by_name():
  mesh = jax.make_mesh((4, 2), ("stage", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.zeros((4, D, D)), "b": jnp.zeros((4, D))}
  x = jnp.zeros((8, B, D))
  with jax.set_mesh(mesh):
    with pytest.raises(schedules.ScheduleError, match="dualpipev on 4 devices runs 8 stages, got 4"):
      scheduled("dualpipev", _stage, _loss, "stage", "data")(params, x, x)
    with pytest.raises(schedules.ScheduleError, match="6 stages do not split over 4 devices"):
      scheduled("1f1b", _stage, _loss, "stage", "data")(
          {"w": jnp.zeros((6, D, D)), "b": jnp.zeros((6, D))}, x, x)
