"""Pipelines run from a schedule's slot lists on 8 simulated devices: 1F1B and GPipe give the
loss and parameter gradients of the stages run one after another; the tick table of a small
1F1B worked by hand; a schedule not yet runnable refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.pipeline import schedules
from moe_jax.pipeline.scheduled import BACKWARD, FORWARD, IDLE, scheduled, tick_table

B, D = 8, 16


def _stage(params, h):
  return jnp.tanh(h @ params["w"] + params["b"])


def _loss(y, targets):
  return jnp.sum((y - targets) ** 2)


def test_a_two_stage_1f1b_tick_table_worked_by_hand():
  # Device 0: F0 F1 . B0 F2 B1 . B2; device 1 (the last stage) a tick behind it: F0 B0 F1 B1
  # F2 B2, each backward right after its forward.
  kinds, microbatches = tick_table(schedules.one_f_one_b(2, 3))
  F, Bk, _ = FORWARD, BACKWARD, IDLE
  assert kinds.tolist() == [[F, F, _, Bk, F, Bk, _, Bk], [_, F, Bk, F, Bk, F, Bk, _]]
  assert microbatches[0].tolist() == [0, 1, 0, 0, 2, 1, 0, 2]
  assert [m for k, m in zip(kinds[1], microbatches[1]) if k] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("microbatches", [3, 9])
@pytest.mark.parametrize("stages,data", [(4, 2), (8, 1)])
@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_a_scheduled_pipeline_gives_the_loss_and_gradients_of_the_stages_in_sequence(
    name, stages, data, microbatches):
  keys = jax.random.split(jax.random.key(stages + microbatches), 4)
  params = {"w": jax.random.normal(keys[0], (stages, D, D)) / 4,
            "b": jax.random.normal(keys[1], (stages, D))}
  x = jax.random.normal(keys[2], (microbatches, B, D))
  targets = jax.random.normal(keys[3], (microbatches, B, D))

  def in_sequence(params):
    total = 0.0
    for m in range(microbatches):
      h = x[m]
      for s in range(stages):
        h = _stage(jax.tree.map(lambda p: p[s], params), h)
      total = total + _loss(h, targets[m])
    return total

  expected_loss, expected = jax.value_and_grad(in_sequence)(params)
  mesh = jax.make_mesh((stages, data), ("stage", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(scheduled(name, _stage, _loss, "stage", "data"))(params, x, targets)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_schedule_that_cannot_run_yet_is_refused_by_name():
  with pytest.raises(schedules.ScheduleError, match="'dualpipev' cannot be run yet"):
    scheduled("dualpipev", _stage, _loss)
