"""Replicas of hot experts: a plan of which expert-parallel rank holds which extra copies.

With experts split over P expert-parallel ranks (E / P "home" experts each, rank r holding
experts r E/P .. (r+1) E/P - 1), skewed routing sends most tokens to the ranks of a few hot
experts, and the busiest rank sets the layer's time. Each rank gets `slots` spare places for
copies of other ranks' experts; a replicated expert's tokens are split evenly over its copies
(home included), so its load per copy falls. DeepSeek's inference load balancer (EPLB)
replicates the experts of highest load per copy the same way.

`plan_replicas(counts, ranks, slots)` fills the slots greedily from the global expert counts
(tokens routed to each expert, e.g. the last interval's): one copy at a time, the one that
leaves the busiest rank least loaded, while copies still help (a copy adds its share to the
rank it lands on, so filling every slot blindly can make the busiest rank busier).
`rank_loads` gives each rank's token count under a plan, `replica_of_assignment` which copy
serves each routed assignment: host-side NumPy, the references. In the program:
`plan_on_device` makes the same plan and `replanned` applies it to a layer's routing state (a
training step replans from its own counts, `moe_jax/steps.py`), `tables` turns a plan's spare
slots into the arrays the layer reads (`expert_parallel.py`).

Shape letters: E experts, P ranks, R spare slots per rank, N routed assignments.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ReplicaPlan(NamedTuple):
  """`spare` [P, R]: the expert each rank's spare slot holds (-1: empty); `copies` [E]: how
  many ranks hold each expert (1 + its replicas); `holders` [E, P]: whether rank p holds
  expert e (home or spare)."""

  spare: np.ndarray
  copies: np.ndarray
  holders: np.ndarray

  @property
  def ranks(self) -> int:
    return self.spare.shape[0]


def home_rank(num_experts: int, ranks: int) -> np.ndarray:
  """[E]: the rank that holds each expert's weights without replicas."""
  if num_experts % ranks:
    raise ValueError(f"{num_experts} experts do not split over {ranks} expert-parallel ranks")
  return np.arange(num_experts) // (num_experts // ranks)


def unreplicated(num_experts: int, ranks: int, slots: int = 0) -> ReplicaPlan:
  """Every expert on its home rank only; `slots` empty spare slots per rank."""
  holders = np.zeros((num_experts, ranks), bool)
  holders[np.arange(num_experts), home_rank(num_experts, ranks)] = True
  return ReplicaPlan(np.full((ranks, slots), -1), np.ones(num_experts, np.int64), holders)


def rank_loads(counts, plan: ReplicaPlan) -> np.ndarray:
  """[P]: tokens each rank computes under `plan`, an expert's `counts[e]` split evenly over its
  copies."""
  counts = np.asarray(counts, np.float64)
  return (plan.holders * (counts / plan.copies)[:, None]).sum(axis=0)


def plan_replicas(counts, ranks: int, slots: int) -> ReplicaPlan:
  """Fills the ranks' `slots` spare slots one copy at a time, each time with the copy (an
  expert with tokens, on a rank with a free slot that lacks it) that leaves the busiest rank
  least loaded (ties: the smaller sum of squared loads, then the lower expert and rank), while
  a copy still lowers the busiest rank's load or, at equal, the spread."""
  counts = np.asarray(counts, np.float64)
  plan = unreplicated(len(counts), ranks, slots)
  spare, copies, holders = plan.spare.copy(), plan.copies.copy(), plan.holders.copy()
  free = np.full(ranks, slots)
  loads = rank_loads(counts, plan)
  for _ in range(ranks * slots):
    best = (loads.max(), np.square(loads).sum())
    choice = None
    for expert in np.flatnonzero(counts > 0):
      without = loads - holders[expert] * counts[expert] / copies[expert]
      share = counts[expert] / (copies[expert] + 1)
      for rank in np.flatnonzero((free > 0) & ~holders[expert]):
        after = without + (holders[expert] | (np.arange(ranks) == rank)) * share
        score = (after.max(), np.square(after).sum())
        if score < best:
          best, choice = score, (expert, rank, after)
    if choice is None:
      break   # no copy lowers the busiest rank or the spread
    expert, rank, loads = choice
    spare[rank, slots - free[rank]] = expert
    free[rank] -= 1
    copies[expert] += 1
    holders[expert, rank] = True
  return ReplicaPlan(spare, copies, holders)


def replica_of_assignment(expert_ids, plan: ReplicaPlan) -> np.ndarray:
  """[N]: the rank whose copy serves each routed assignment (`expert_ids` [N], in order): an
  expert's assignments split into `copies[e]` consecutive runs of near-equal length, the
  first to its home rank, the rest to its spare copies in rank order."""
  expert_ids = np.asarray(expert_ids)
  num_experts = len(plan.copies)
  counts = np.bincount(expert_ids, minlength=num_experts)
  order = np.argsort(expert_ids, kind="stable")
  position = np.empty(len(expert_ids), np.int64)     # index among its expert's assignments
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  position[order] = np.arange(len(expert_ids)) - np.repeat(starts, counts)
  copy = position * plan.copies[expert_ids] // np.maximum(counts[expert_ids], 1)
  return copy_ranks(plan)[expert_ids, copy]


def copy_ranks(plan: ReplicaPlan) -> np.ndarray:
  """[E, P]: the rank of each copy of an expert, home first, then its spare copies in rank
  order; -1 past its copies."""
  num_experts, ranks = plan.holders.shape
  home = home_rank(num_experts, ranks)
  table = np.full((num_experts, ranks), -1)
  for e in range(num_experts):
    spares = [p for p in range(ranks) if plan.holders[e, p] and p != home[e]]
    table[e, :1 + len(spares)] = [home[e], *spares]
  return table


class ReplicaTables(NamedTuple):
  """A plan as arrays for the compiled layer (they change with the plan, the program does not):
  `slot_expert` [P, E / P + R]: the expert in each of a rank's slots (its home experts, then
  its spare slots; -1 empty); `copy_rank` [E, P]: `copy_ranks`; `copies` [E]."""

  slot_expert: jnp.ndarray
  copy_rank: jnp.ndarray
  copies: jnp.ndarray


def tables(spare_PxR, num_experts: int) -> ReplicaTables:
  """The layer's tables of the plan whose spare slots are `spare_PxR` (a `ReplicaPlan.spare`,
  or `plan_on_device`'s), computed in the program. A spare entry that names an expert its rank
  holds already (a plan made for another rank count) adds no copy."""
  spare = jnp.asarray(spare_PxR, jnp.int32)
  ranks = spare.shape[0]
  experts = jnp.arange(num_experts)
  home = experts // (num_experts // ranks)
  is_home = home[:, None] == jnp.arange(ranks)[None, :]                         # [E, P]
  holds_spare = jnp.any(spare[None, :, :] == experts[:, None, None], axis=-1)   # [E, P]
  holders = is_home | holds_spare
  copies = jnp.sum(holders, axis=1).astype(jnp.int32)
  # Home first, then the other holders in rank order, then -1.
  order_key = jnp.where(is_home, -1, jnp.where(holders, jnp.arange(ranks)[None, :], ranks))
  by_order = jnp.argsort(order_key, axis=1, stable=True).astype(jnp.int32)
  copy_rank = jnp.where(jnp.arange(ranks)[None, :] < copies[:, None], by_order, -1)
  slot_expert = jnp.concatenate([experts.reshape(ranks, -1).astype(jnp.int32), spare], axis=1)
  return ReplicaTables(slot_expert, copy_rank, copies)


def plan_on_device(counts_E, ranks: int, slots: int) -> jnp.ndarray:
  """`plan_replicas(counts, ranks, slots).spare` [P, R] computed in the program (float32), so a
  training step can replan from its own counts without a trip to the host: the same greedy
  choice, each of the P x R rounds scoring every (expert, rank) copy at once."""
  counts = jnp.asarray(counts_E, jnp.float32)
  num_experts = counts.shape[0]
  home = jnp.arange(num_experts) // (num_experts // ranks)
  rank_ids = jnp.arange(ranks)
  holders = home[:, None] == rank_ids[None, :]                                   # [E, P]
  copies = jnp.ones(num_experts, jnp.float32)
  loads = jnp.sum(holders * counts[:, None], axis=0)
  spare = jnp.full((ranks, slots), -1, jnp.int32)
  free = jnp.full(ranks, slots, jnp.int32)

  def one_copy(_, carry):
    spare, free, copies, holders, loads = carry
    without = loads[None, :] - holders * (counts / copies)[:, None]              # [E, P]
    share = counts / (copies + 1)
    # after[e, p, q]: rank q's load with a copy of expert e added on rank p.
    lands = holders[:, None, :] | (rank_ids[None, :, None] == rank_ids[None, None, :])
    after = without[:, None, :] + lands * share[:, None, None]
    busiest, spread = jnp.max(after, axis=-1), jnp.sum(jnp.square(after), axis=-1)
    now_busiest, now_spread = jnp.max(loads), jnp.sum(jnp.square(loads))
    allowed = (counts[:, None] > 0) & (free[None, :] > 0) & ~holders
    better = allowed & ((busiest < now_busiest) | ((busiest == now_busiest) & (spread < now_spread)))
    least = jnp.min(jnp.where(better, busiest, jnp.inf))
    tied = better & (busiest == least)
    chosen = tied & (spread == jnp.min(jnp.where(tied, spread, jnp.inf)))
    flat = jnp.argmax(chosen.reshape(-1))          # the first: lowest expert, then rank
    expert, rank = flat // ranks, flat % ranks
    found = jnp.any(better)
    slot = slots - free[rank]
    spare = jnp.where(found, spare.at[rank, jnp.minimum(slot, slots - 1)].set(expert), spare)
    free = jnp.where(found, free.at[rank].add(-1), free)
    holders = jnp.where(found, holders.at[expert, rank].set(True), holders)
    loads = jnp.where(found, after[expert, rank], loads)
    copies = jnp.where(found, copies.at[expert].add(1), copies)
    return spare, free, copies, holders, loads

  return jax.lax.fori_loop(0, ranks * slots, one_copy,
                           (spare, free, copies, holders, loads))[0]


def replanned(slots_ExR, summed_E, due, ranks: int):
  """(spare slots [E, R], counts since the plan [E]) of a layer's routing state after a step
  (a stack of layers: leading axes on both): when `due`, the plan `plan_on_device` makes from
  `summed_E` over `ranks` ranks (rows past them empty) and counts started again; else as
  they were."""
  num_experts, slots = slots_ExR.shape[-2:]
  plan = lambda counts: jnp.full((num_experts, slots), -1, jnp.int32).at[:ranks].set(
      plan_on_device(counts, ranks, slots))
  for _ in range(summed_E.ndim - 1):
    plan = jax.vmap(plan)
  return (jax.lax.cond(due, plan, lambda _: slots_ExR, summed_E),
          jnp.where(due, jnp.zeros_like(summed_E), summed_E))
