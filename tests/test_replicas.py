"""Replicas of hot experts: the planner's choices and the token split, worked by hand."""

import numpy as np
import pytest

from moe_jax.dispatch.replicas import (ReplicaPlan, copy_ranks, plan_on_device, plan_replicas,
                                       rank_loads, replica_of_assignment, tables, unreplicated)


def test_the_hot_expert_gets_a_copy_on_the_idle_rank_and_the_busiest_rank_falls():
  # 4 experts on 2 ranks (rank 0: experts 0, 1; rank 1: 2, 3), one spare slot each. Loads
  # 12 and 4. Expert 0 (10 per copy) goes to rank 1, the least loaded: 5 + 2 = 7 and
  # 2 + 2 + 5 = 9. Then expert 0 has no free rank left, nor has expert 1 (rank 1 is full);
  # expert 2 (2 per copy, lower index than 3) goes to rank 0: 5 + 2 + 1 = 8, 1 + 2 + 5 = 8.
  counts = [10, 2, 2, 2]
  np.testing.assert_array_equal(rank_loads(counts, unreplicated(4, 2)), [12, 4])
  plan = plan_replicas(counts, ranks=2, slots=1)
  assert plan.spare.tolist() == [[2], [0]]
  assert plan.copies.tolist() == [2, 1, 2, 1]
  np.testing.assert_array_equal(rank_loads(counts, plan), [8, 8])


def test_each_copy_serves_a_consecutive_run_of_its_experts_assignments():
  # The plan above: expert 0 at home on rank 0 and spare on rank 1, expert 2 at home on
  # rank 1 and spare on rank 0. Expert 0's four assignments: two and two; expert 2's two:
  # one and one; expert 1's one: its home, rank 0.
  plan = plan_replicas([10, 2, 2, 2], ranks=2, slots=1)
  assert replica_of_assignment([0, 0, 0, 0, 2, 1, 2], plan).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_experts_without_tokens_get_no_copies():
  plan = plan_replicas([0, 0, 0, 0], ranks=2, slots=2)
  assert (plan.spare == -1).all() and plan.copies.tolist() == [1, 1, 1, 1]


def test_experts_that_do_not_split_over_the_ranks_are_refused():
  with pytest.raises(ValueError, match="6 experts do not split over 4 expert-parallel ranks"):
    plan_replicas(np.ones(6), ranks=4, slots=1)


def test_a_copy_goes_where_it_lowers_the_busiest_rank_and_none_where_it_would_raise_it():
  # 3 experts, one per rank, loads 9, 3, 0. Expert 0's copy on rank 2 gives 4.5, 3, 4.5 (on
  # rank 1 it would give 4.5, 7.5, 0). Then a third copy of expert 0 (on rank 1: 3, 6, 3) or
  # a copy of expert 1 on rank 0 (6, 1.5, 4.5) would raise the busiest rank: none is made.
  plan = plan_replicas([9, 3, 0], ranks=3, slots=1)
  assert plan.spare.tolist() == [[-1], [-1], [0]]
  np.testing.assert_array_equal(rank_loads([9, 3, 0], plan), [4.5, 3, 4.5])


def test_the_layer_splits_assignments_over_copies_as_the_reference_does():
  """`expert_parallel.serving_ranks` (what the compiled layer runs) against the NumPy
  `replica_of_assignment`, on 4,096 assignments skewed onto a few of 64 experts over 8 ranks,
  2 spare slots each; the busiest rank's share of them falls."""
  import jax.numpy as jnp
  from moe_jax.dispatch.expert_parallel import serving_ranks
  rng = np.random.default_rng(0)
  ids = rng.choice(64, size=4096, p=rng.dirichlet(np.full(64, 0.3)))
  plan = plan_replicas(np.bincount(ids, minlength=64), ranks=8, slots=2)
  expected = replica_of_assignment(ids, plan)
  got = np.asarray(serving_ranks(jnp.asarray(ids, jnp.int32), tables(plan.spare, 64)))
  np.testing.assert_array_equal(got, expected)
  home = np.bincount(ids // 8, minlength=8)
  assert np.bincount(got, minlength=8).max() < 0.8 * home.max()


def _plan_of(spare, num_experts):
  """The NumPy plan whose spare slots are `spare` [P, R]."""
  holders = unreplicated(num_experts, len(spare)).holders.copy()
  for rank, experts in enumerate(spare):
    holders[experts[experts >= 0], rank] = True
  return ReplicaPlan(np.asarray(spare), holders.sum(axis=1), holders)


def test_the_step_plans_as_the_reference_does():
  """`plan_on_device` (what a training step runs, float32) against the NumPy `plan_replicas`:
  the same spare slots on the hand-worked cases; on skewed counts (64 experts, 2 to 16 ranks,
  1 to 4 slots) the same busiest-rank load (float32 and float64 may break an exact tie of the
  spread differently), and the layer's tables equal the reference's copy ranks."""
  import jax.numpy as jnp
  for counts, ranks, slots in [([10, 2, 2, 2], 2, 1), ([9, 3, 0], 3, 1), ([0, 0, 0, 0], 2, 2)]:
    expected = plan_replicas(counts, ranks, slots).spare
    np.testing.assert_array_equal(plan_on_device(jnp.asarray(counts), ranks, slots), expected)
  rng = np.random.default_rng(1)
  for ranks, slots in [(2, 1), (4, 2), (8, 1), (8, 4), (16, 2)]:
    counts = rng.multinomial(8192, rng.dirichlet(np.full(64, 0.3)))
    expected = plan_replicas(counts, ranks, slots)
    spare = np.asarray(plan_on_device(jnp.asarray(counts), ranks, slots))
    plan = _plan_of(spare, 64)
    assert (plan.copies > 1).any()
    np.testing.assert_allclose(rank_loads(counts, plan).max(),
                               rank_loads(counts, expected).max(), rtol=1e-6)
    layer = tables(spare, 64)
    np.testing.assert_array_equal(layer.copy_rank, copy_ranks(plan))
    np.testing.assert_array_equal(layer.copies, plan.copies)
