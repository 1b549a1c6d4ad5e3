"""Expert parallelism on 8 simulated devices: every variant against the loop-over-experts
reference on meshes (8,1), (4,2), (2,4), (1,8); drop counts; a whole training step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.default import get_config
from moe_jax import parallel, routing
from moe_jax.checkpoint import Checkpointer
from moe_jax.dispatch import SwiGLUExperts, expert_capacity, reference_dispatch
from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT, expert_parallel_dispatch
from moe_jax.layers.moe import BalancingBias, ReplicaSlots
from moe_jax.model import ModelSpec
from moe_jax.train import train_and_evaluate
from tests.mesh_steps import train_on_mesh

B, S, D, F, E, K = 16, 8, 16, 8, 8, 2
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
CPU_VARIANTS = ["all_to_all", "all_gather", "token_all_to_all"]


def _problem(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (B, S, D))
  weights = (jax.random.normal(keys[1], (E, D, F)) / 4, jax.random.normal(keys[2], (E, D, F)) / 4,
             jax.random.normal(keys[3], (E, F, D)) / 3)
  decision = routing.topk_route(jax.random.normal(keys[4], (B * S, E)) * 2, None, top_k=K)
  return x, weights, decision.expert_ids.reshape(B, S, K), decision.gates.reshape(B, S, K)


def _reference(x, weights, ids, gates, fp8=False):
  out = reference_dispatch(x.reshape(B * S, D), ids.reshape(B * S, K), gates.reshape(B * S, K),
                           SwiGLUExperts(*weights, fp8=fp8))
  return out.output.reshape(B, S, D)


def _expert_parallel(variant, mesh_shape, capacity_factor, fp8=False):
  mesh = parallel.make_mesh(*mesh_shape)
  tokens = NamedSharding(mesh, P(("data", "expert")))
  experts = NamedSharding(mesh, P("expert"))

  def run(x, weights, ids, gates):
    with jax.set_mesh(mesh):
      placed = (jax.device_put(x, tokens), jax.device_put(weights, experts),
                jax.device_put(ids, tokens), jax.device_put(gates, tokens))
      fn = lambda x, w, ids, g: expert_parallel_dispatch(
          variant, x, ids, g, SwiGLUExperts(*w, fp8=fp8), capacity_factor)
      return jax.jit(fn)(*placed), placed
  return run, mesh


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[f"{d}x{e}" for d, e in MESHES])
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_outputs_and_gradients_match_reference(variant, mesh_shape):
  x, weights, ids, gates = _problem()
  run, mesh = _expert_parallel(variant, mesh_shape, capacity_factor=E / K)   # nothing drops
  (y, dropped), _ = run(x, weights, ids, gates)
  np.testing.assert_allclose(y, _reference(x, weights, ids, gates), rtol=1e-5, atol=1e-5)
  assert float(dropped) == 0.0

  loss_ref = lambda x, w: jnp.sum(_reference(x, w, ids, gates) ** 2)
  expected = jax.grad(loss_ref, argnums=(0, 1))(x, weights)
  with jax.set_mesh(mesh):
    tokens = NamedSharding(mesh, P(("data", "expert")))
    loss_ep = lambda x, w: jnp.sum(expert_parallel_dispatch(
        variant, x, jax.device_put(ids, tokens), jax.device_put(gates, tokens),
        SwiGLUExperts(*w), E / K)[0] ** 2)
    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(
        jax.device_put(x, tokens), jax.device_put(weights, NamedSharding(mesh, P("expert"))))
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_fp8_experts_stay_fp8_across_devices(variant):
  """Each device's experts quantize as one device's do: a token's output is the FP8 reference's
  (activations are scaled per token), and not the unquantized one."""
  x, weights, ids, gates = _problem()
  run, _ = _expert_parallel(variant, (2, 4), capacity_factor=E / K, fp8=True)
  (y, _), _ = run(x, weights, ids, gates)
  np.testing.assert_allclose(y, _reference(x, weights, ids, gates, fp8=True), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y) - np.asarray(_reference(x, weights, ids, gates))).max() > 1e-4


@pytest.mark.parametrize("chunks", [2, 4])
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_chunked_dispatch_matches_the_reference(variant, chunks):
  """Each device's tokens in slices (for overlap): the same function when nothing drops."""
  _check_against_reference((2, 4), *_problem(2), variant=variant, chunks=chunks)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_dispatch_inside_a_shard_map_manual_over_the_token_axes(variant):
  """Called inside a caller's shard_map that already split the tokens over the token axes and
  the experts over `expert` (as a pipeline stage would), the dispatch runs its per-device body
  on those arrays: output, drop count and the gradients of tokens and weights equal the
  single-device reference. Tokens left whole along one of the manual axes are refused."""
  x, weights, ids, gates = _problem(3)
  mesh = parallel.make_mesh(2, 4)
  experts = P("expert")

  def inside(x, w, ids, gates):   # the drop count is this device's: the caller sums it
    y, dropped = expert_parallel_dispatch(variant, x, ids, gates, SwiGLUExperts(*w), E / K)
    return y, jax.lax.psum(dropped, ("data", "fsdp", "expert"))

  def manual(tokens):
    return jax.shard_map(inside, mesh=mesh, in_specs=(tokens, experts, tokens, tokens),
                         out_specs=(tokens, P()))   # manual over every mesh axis

  fn = manual(P(("data", "fsdp", "expert")))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"tokens over every one of those axes \(not split "
                                         r"over: \['fsdp'\]\)"):
      jax.jit(manual(P(("data", "expert"))))(x, weights, ids, gates)
    y, dropped = jax.jit(fn)(x, weights, ids, gates)
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, ids, gates)[0] ** 2),
                             argnums=(0, 1)))(x, weights)
  np.testing.assert_allclose(y, _reference(x, weights, ids, gates), rtol=1e-5, atol=1e-5)
  assert float(dropped) == 0.0
  expected = jax.grad(lambda x, w: jnp.sum(_reference(x, w, ids, gates) ** 2),
                      argnums=(0, 1))(x, weights)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _check_against_reference(mesh_shape, x, weights, ids, gates, **dispatch_args):
  """`expert_parallel_dispatch(**dispatch_args)` on a (data, expert) mesh: output and the
  gradients of tokens and weights equal the single-device reference (nothing drops)."""
  mesh = parallel.make_mesh(*mesh_shape)
  tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
  with jax.set_mesh(mesh):
    ids_placed, gates_placed = jax.device_put(ids, tokens), jax.device_put(gates, tokens)
    fn = lambda x, w: expert_parallel_dispatch(
        x_BxSxD=x, expert_ids_BxSxK=ids_placed, gates_BxSxK=gates_placed,
        experts=SwiGLUExperts(*w), capacity_factor=E / K, **dispatch_args)[0]
    args = (jax.device_put(x, tokens), jax.device_put(weights, experts))
    y = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))(*args)
  np.testing.assert_allclose(y, _reference(x, weights, ids, gates), rtol=1e-5, atol=1e-5)
  expected = jax.grad(lambda x, w: jnp.sum(_reference(x, w, ids, gates) ** 2), argnums=(0, 1))(
      x, weights)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(4, 2), (1, 8)], ids=["4x2", "1x8"])
def test_all_to_all_counts_drops_per_device(mesh_shape):
  x, weights, ids, gates = _problem(1)
  run, _ = _expert_parallel("all_to_all", mesh_shape, capacity_factor=0.5)
  (_, dropped), _ = run(x, weights, ids, gates)
  per_device = B // 8                                # sequences per device (8 token shards)
  capacity = expert_capacity(per_device * S, K, E, 0.5)
  expected = 0
  for device in range(8):
    local = np.asarray(ids[device * per_device:(device + 1) * per_device]).reshape(-1)
    expected += np.maximum(np.bincount(local, minlength=E) - capacity, 0).sum()
  assert expected > 0 and float(dropped) == expected


@pytest.mark.parametrize("variant", [*CPU_VARIANTS, "all_gather+replicas"])
def test_training_step_with_expert_parallelism_matches_data_parallel(tiny_config, variant):
  """Two steps on routing skewed onto experts 0 and 1 (both on rank 0 of 4): equal to data
  parallelism. With replicas (one spare slot per rank, replanned after every step), step 2
  runs on the plan made from step 1's counts, which copies the hot experts."""
  tiny_config.dispatch.capacity_factor = float(tiny_config.model.num_routed_experts)  # no drops
  variant, _, replicas = variant.partition("+")
  tiny_config.dispatch.update(expert_replicas=int(bool(replicas)), replica_replan_every=1)
  batches = [np.random.default_rng(i).integers(0, 256, (8, 33), dtype=np.int32) for i in range(2)]
  skew = jnp.zeros(tiny_config.model.num_routed_experts).at[:2].set(0.5)

  ep_state, ep_losses = _train_steps(tiny_config, batches, (2, 4), variant, bias_offset=skew)
  tiny_config.dispatch.expert_replicas = 0
  dp_state, dp_losses = _train_steps(tiny_config, batches, (8, 1), "none", bias_offset=skew)
  np.testing.assert_allclose(ep_losses, dp_losses, rtol=1e-5)
  # Summation order differs between layouts; Adam turns float-noise in near-zero gradients
  # into update differences far below the step size (lr = 1e-2): 1e-4, 1% of one step, bounds
  # them (a wrong expert or gradient moves whole steps).
  same_kind = lambda state: (state.params, state.opt_state, state.biases.filter(BalancingBias))
  for a, b in zip(jax.tree.leaves(same_kind(ep_state)), jax.tree.leaves(same_kind(dp_state))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  w_up = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(ep_state.params)
          if "w_up" in jax.tree_util.keystr(path) and leaf.ndim == 3][0]
  assert w_up.sharding.spec == P("expert", None, None)
  num_experts = tiny_config.model.num_routed_experts
  assert {shard.data.shape[0] for shard in w_up.addressable_shards} == {num_experts // 4}
  if replicas:
    plan = np.asarray(ep_state.biases.filter(ReplicaSlots)["blocks"][1]["mlp"]["replica_slots"][...])
    assert set(plan[:4].ravel()) & {0, 1}   # the hot experts have copies


def test_zero1_optimizer_sharding_matches_replicated(tiny_config):
  batches = [np.random.default_rng(i).integers(0, 256, (8, 33), dtype=np.int32) for i in range(2)]
  sharded, sharded_losses = _train_steps(tiny_config, batches, (8, 1), "none", zero1=True)
  replicated, losses = _train_steps(tiny_config, batches, (8, 1), "none")
  np.testing.assert_allclose(sharded_losses, losses, rtol=1e-6)
  # The split moments sum their gradients in another order: float noise, which Adam turns into
  # update differences up to about 2e-5 where a gradient is near zero; 1e-4 (1% of one step at
  # lr 1e-2) bounds them, as above, while a wrong shard would move whole steps.
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(replicated)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  moments = [(jax.tree_util.keystr(p), leaf) for p, leaf in
             jax.tree_util.tree_leaves_with_path(sharded.opt_state) if "unembed" in jax.tree_util.keystr(p)]
  assert moments and all(leaf.sharding.spec == P("data") for _, leaf in moments)
  assert all(leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 8 for _, leaf in moments)


def _train_steps(config, batches, mesh_shape, expert_parallel, zero1=False, bias_offset=None):
  """Training steps jitted as the training loop jits them (state layout kept across steps)."""
  config.dispatch.expert_parallel = expert_parallel
  config.dispatch.strategy = DISPATCHER_OF_VARIANT.get(expert_parallel, "capacity")
  return train_on_mesh(config, parallel.make_mesh(*mesh_shape), batches,
                       parallel.DEFAULT_RULES, zero1=zero1, bias_offset=bias_offset)


def test_training_run_with_expert_parallelism_and_replicas_resumes(tmp_path):
  """`all_gather` over 8 ranks with a spare slot each, replanned every 2 steps: stopped after
  step 3 (a plan from step 2 and step 3's counts in the checkpoint) and resumed, the run is
  the uninterrupted one, plans included."""
  config = get_config("tiny,steps=6,ep=all_gather")
  config.dispatch.update(expert_replicas=1, replica_replan_every=2)
  config.train.update(log_every=1, eval_every=6, checkpoint_every=100, sample_tokens=8)
  config.optimizer.warmup_steps = 1
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(config, straight)
  train_and_evaluate(config, resumed, stop_after_step=3)
  final = train_and_evaluate(config, resumed)
  assert np.isfinite(final["validation_loss"])
  losses = lambda workdir: {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
                            if "loss" in r}
  assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
  assert losses(resumed) == losses(straight)   # the resumed half continued the same run
  states = [Checkpointer(w / "checkpoints", 2).manager.restore(6)["state"] for w in (straight, resumed)]
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
  plan = np.asarray(states[0]["biases"]["blocks"]["1"]["mlp"]["replica_slots"]["value"])
  assert (plan >= 0).any()   # the run made copies


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[f"{d}x{e}" for d, e in MESHES])
def test_every_dispatcher_on_a_sharded_batch_matches_reference(tiny_config, mesh_shape):
  """The MoE model with each single-device dispatcher, batch split over the mesh, equals the
  loop-over-experts reference on one device (capacity large enough that nothing drops)."""
  from flax import nnx
  from moe_jax.dispatch import DISPATCHERS
  from moe_jax.model import Transformer
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (8, 16)), jnp.int32)
  tiny_config.dispatch.capacity_factor = float(tiny_config.model.num_routed_experts)
  outputs = {}
  mesh = parallel.make_mesh(*mesh_shape)
  for name in sorted(DISPATCHERS):
    tiny_config.dispatch.strategy = name
    model = Transformer(ModelSpec.from_config(tiny_config), nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
      batch = tokens if name == "reference" else parallel.global_batch(np.asarray(tokens), mesh)
      logits, stats = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, batch)
    outputs[name] = (np.asarray(logits), float(stats.dropped_fraction.sum()))
  for name, (logits, dropped) in outputs.items():
    np.testing.assert_allclose(logits, outputs["reference"][0], rtol=1e-4, atol=1e-4, err_msg=name)
    assert dropped == 0.0, name


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)], ids=["2x4", "1x8"])
def test_replicas_of_hot_experts_give_the_reference_and_share_its_tokens(mesh_shape):
  """`all_gather` with a replica plan made for skewed routing (most tokens to experts 0 and
  1, both at home on rank 0): outputs and gradients (the copies' summed into their home
  experts) equal the single-device reference."""
  from moe_jax.dispatch.replicas import plan_replicas
  x, weights, _, _ = _problem(3)
  logits = jax.random.normal(jax.random.key(4), (B * S, E)) + jnp.array([4.0, 3.0] + [0.0] * 6)
  decision = routing.topk_route(logits, None, top_k=K)
  ids, gates = decision.expert_ids.reshape(B, S, K), decision.gates.reshape(B, S, K)
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
  plan = plan_replicas(counts, mesh_shape[1], slots=1)
  assert plan.copies.max() > 1   # the test is about copies
  _check_against_reference(mesh_shape, x, weights, ids, gates, variant="all_gather",
                           replica_slots=jnp.asarray(plan.spare, jnp.int32))
