"""Training: a sharded step, the bias update, loss going down, outputs, and exact resume."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import analysis, parallel, routing, steps, train
from moe_jax.checkpoint import Checkpointer, CheckpointMismatch
from moe_jax.model import ModelSpec
from moe_jax.routing import BalancingSettings
from moe_jax.train import train_and_evaluate


def _run_steps(config, devices, batches, microbatches=1):
  mesh = parallel.make_mesh(len(devices), 1, devices)
  o = config.optimizer
  tx = steps.make_optimizer(steps.make_schedule(o.learning_rate, o.warmup_steps, 10, 0.1),
                            o.b1, o.b2, o.weight_decay, o.grad_clip_norm)
  graphdef, state = steps.init_state(ModelSpec.from_config(config), tx, 0)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   microbatches=microbatches))
  balancing = routing.BalancingValues.of(
      BalancingSettings.from_section(config.balancing).replace(bias_update_rate=1e-2))
  history = []
  for batch in batches:
    state, metrics = step(state, parallel.global_batch(batch, mesh), None, None, balancing)
    history.append(jax.device_get(metrics))
  return state, history


def test_sharded_step_matches_single_device(tiny_config):
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (8, 33), dtype=np.int32) for _ in range(3)]
  state8, history8 = _run_steps(tiny_config, jax.devices(), batches)
  state1, history1 = _run_steps(tiny_config, jax.devices()[:1], batches)
  assert len(state8.params["embed"].sharding.device_set) == 8
  for h8, h1 in zip(history8, history1):
    for key in h1:
      if key == "routing":
        continue
      np.testing.assert_allclose(h8[key], h1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("devices, microbatches", [(1, 4), (8, 2)])
def test_a_step_over_microbatches_equals_one_over_the_whole_batch(tiny_config, devices,
                                                                   microbatches):
  """Gradient accumulation: 3 steps of 16 sequences in `microbatches` slices (on 8 devices:
  each slice split over all of them) against one device's steps on the whole batches. Losses
  and metrics within 2e-5 relative, the state (parameters, Adam moments, balancing biases)
  within 2e-4 relative + 2e-6, the expert counts the bias update sees exactly equal."""
  rng = np.random.default_rng(4)
  batches = [rng.integers(0, 256, (16, 33), dtype=np.int32) for _ in range(3)]
  whole, history = _run_steps(tiny_config, jax.devices()[:1], batches)
  sliced, sliced_history = _run_steps(tiny_config, jax.devices()[:devices], batches,
                                      microbatches)
  for h, s in zip(history, sliced_history):
    np.testing.assert_array_equal(s["routing"]["counts"], h["routing"]["counts"])
    for key in h:
      for name, a, b in (((key, s[key], h[key]),) if key != "routing" else
                         [(k, s[key][k], h[key][k]) for k in h[key]]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_bias_update_uses_global_counts_and_no_gradient(tiny_config):
  rng = np.random.default_rng(1)
  batch = rng.integers(0, 256, (8, 33), dtype=np.int32)
  state, _ = _run_steps(tiny_config, jax.devices(), [batch])
  graphdef, initial = steps.init_state(ModelSpec.from_config(tiny_config),
                                       steps.make_optimizer(0.0, 0.9, 0.95, 0.0, 1.0), 0)
  # Counts of the whole global batch, under the initial parameters and zero biases.
  _, (_, stats, _) = steps.loss_fn(initial.params, initial.biases, graphdef, jnp.asarray(batch))
  expected = jax.vmap(lambda c: routing.update_balancing_bias(jnp.zeros_like(c), c, 1e-2))(stats.counts)
  got = jnp.stack(jax.tree.leaves(state.biases))
  np.testing.assert_allclose(got, expected, atol=1e-7)
  assert set(np.unique(np.round(np.abs(np.asarray(got)) / 1e-2))) <= {0.0, 1.0}
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert opt_paths and not any("balancing_bias" in p for p in opt_paths)


def _config(tiny_config, **train):
  tiny_config.train.update(train)
  return tiny_config


def _metrics(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_short_run_learns_and_writes_its_outputs(tiny_config, tmp_path):
  final = train_and_evaluate(tiny_config, tmp_path)
  assert final["validation_loss"] < 0.65 * math.log(tiny_config.model.vocab_size)
  assert final["validation_bits_per_byte"] < 5.5
  train_losses = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
  assert train_losses[-1] < 0.7 * train_losses[0]
  logged = [m for m in _metrics(tmp_path) if "loss" in m][-1]
  for key in ("max_violation", "entropy", "confidence", "dead_experts", "dropped_fraction",
              "routing/layer0/max_violation", "routing/layer0/load_max", "sequence_loss",
              "tokens_per_second", "tflops_per_device"):
    assert np.isfinite(logged[key]), key
  details = [json.loads(line) for line in open(tmp_path / "routing.jsonl")][-1]
  num_experts = tiny_config.model.num_routed_experts
  np.testing.assert_allclose(np.sum(details["load"], axis=-1), 1.0, rtol=1e-4)
  coactivation = np.asarray(details["coactivation"])
  assert coactivation.shape == (1, num_experts, num_experts)
  np.testing.assert_allclose(coactivation, np.swapaxes(coactivation, 1, 2))
  # Each token uses K experts, so the diagonal (share of tokens per expert) sums to K.
  np.testing.assert_allclose(np.trace(coactivation[0]), tiny_config.router.top_k, rtol=1e-4)
  for name in ("config.json", "data_manifest.json", "final_metrics.json", "sample.txt",
               "expert_load.png", "routing.jsonl"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert Checkpointer(tmp_path / "checkpoints", 2).latest_step() == tiny_config.train.steps


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_exact_resume(tiny_config, tmp_path, monkeypatch, moment_dtype):
  """N steps straight == N/2 steps, stop, resume to N: bitwise on CPU (Adam's moments in
  float32, or stored in bf16: optimizer.moment_dtype). The three runs in this process trace
  the training step once (`train.reused_jit`), and the step they run is the module's current
  one (here a patched one that counts its traces)."""
  traces, original = [], steps.train_step
  monkeypatch.setattr(steps, "train_step",
                      lambda *args, **kwargs: traces.append(1) or original(*args, **kwargs))
  tiny_config.optimizer.moment_dtype = moment_dtype
  config = _config(tiny_config, steps=8, log_every=1, eval_every=100, checkpoint_every=100,
                   sample_tokens=0)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(config, straight)
  train_and_evaluate(config, resumed, stop_after_step=4)
  assert Checkpointer(resumed / "checkpoints", 2).latest_step() == 4
  train_and_evaluate(config, resumed)

  losses = lambda workdir: {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}
  assert losses(straight) == losses(resumed)
  assert sorted(losses(resumed)) == list(range(1, 9))
  states = []
  for workdir in (straight, resumed):
    checkpointer = Checkpointer(workdir / "checkpoints", 2)
    states.append(checkpointer.manager.restore(8)["state"])
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
  stored = {np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(states[0]["opt_state"])
            if np.ndim(leaf)}
  assert stored == {moment_dtype}, stored   # the moments, as the setting says
  assert len(traces) == 1, traces


def test_runs_differing_only_in_their_schedule_share_one_step_and_train_by_their_own(
    tiny_config, tmp_path, monkeypatch):
  """A run in the same process as an earlier one, with another learning rate and length (the
  schedule's values are arguments of the step), runs the same traced step and trains by its
  own schedule; so do one with other balancing values (bias rate, the auxiliary losses'
  coefficients), its loss adding its own, and one with another weight decay and clipping
  norm; another Adam b2 (which the optimizer inside the step holds) traces its own step. A
  run with another seed (an argument of the initial state's program) shares that program and
  starts from other parameters."""
  traces, original = [], steps.train_step
  monkeypatch.setattr(steps, "train_step",
                      lambda *args, **kwargs: traces.append(1) or original(*args, **kwargs))
  init_traces, original_init = [], train.initial_state
  monkeypatch.setattr(train, "initial_state", lambda *args, **kwargs: init_traces.append(1) or
                      original_init(*args, **kwargs))
  config = _config(tiny_config, steps=8, log_every=1, eval_every=100, checkpoint_every=100,
                   sample_tokens=0)
  losses = lambda workdir: [m["loss"] for m in _metrics(workdir) if "loss" in m]
  train_and_evaluate(config, tmp_path / "first")
  config.optimizer.learning_rate *= 4
  config.train.steps = 10
  train_and_evaluate(config, tmp_path / "faster")
  assert len(traces) == 1, traces
  first, faster = losses(tmp_path / "first"), losses(tmp_path / "faster")
  assert len(faster) == 10 and first[0] == faster[0]   # the same start (lr 0 at step 1)
  assert first[7] != faster[7]
  config.seed += 1
  config.optimizer.warmup_steps, config.train.steps = 1, 3
  train_and_evaluate(config, tmp_path / "other_seed")
  assert len(traces) == 1 and len(init_traces) == 1, (traces, init_traces)
  assert losses(tmp_path / "other_seed")[0] != faster[0]   # another start
  # The first runs: bias rate 1e-2 and the sequence-wise loss at 1e-4. Now no bias update,
  # the Switch loss at 1e-2 and the z-loss at 1e-3.
  aux = lambda workdir: [(m["loss"] - m["cross_entropy"], m["switch_loss"], m["sequence_loss"],
                          m["z_loss"]) for m in _metrics(workdir) if "loss" in m]
  assert all(s == z == 0 < q and d == pytest.approx(q, abs=1e-6)   # float32 loss of about 6
             for d, s, q, z in aux(tmp_path / "first"))
  config.balancing.update(bias_update_rate=0.0, sequence_loss_alpha=0.0, switch_loss_alpha=1e-2,
                          z_loss_coef=1e-3)
  train_and_evaluate(config, tmp_path / "other_balancing")
  assert len(traces) == 1, traces
  assert all(q == 0 < z < s < 0.02 and d == pytest.approx(s + z, abs=1e-6)
             for d, s, q, z in aux(tmp_path / "other_balancing"))
  assert not analysis.bias_history(tmp_path / "other_balancing")[1].any()
  assert analysis.bias_history(tmp_path / "first")[1].any()
  config.optimizer.weight_decay, config.optimizer.grad_clip_norm = 0.0, 0.05
  train_and_evaluate(config, tmp_path / "no_decay")
  assert len(traces) == 1, traces
  assert losses(tmp_path / "no_decay")[-1] != losses(tmp_path / "other_balancing")[-1]
  config.optimizer.b2 = 0.99
  train_and_evaluate(config, tmp_path / "other_b2")
  assert len(traces) == 2, traces
  assert losses(tmp_path / "other_b2")[-1] != losses(tmp_path / "no_decay")[-1]


def test_the_initial_state_from_a_seed_argument_is_that_of_the_seed(tiny_config):
  """`train.initial_state` takes the seed as an array (`train.seed_argument`): its key is the
  seed's own for seeds past 32 bits too, and its state equals `steps.init_state`'s with the
  seed as a constant, bit for bit."""
  for seed in (0, 7, 2**31, 2**32 + 7, 2**40 + 3):
    np.testing.assert_array_equal(
        jax.random.key_data(jax.jit(jax.random.key)(train.seed_argument(seed))),
        jax.random.key_data(jax.random.key(seed)), err_msg=str(seed))
  spec = ModelSpec.from_config(tiny_config)
  tx = optax.adam(1e-3)
  given = jax.jit(functools.partial(train.initial_state, spec=spec, tx=tx))(
      train.seed_argument(7))
  constant = jax.jit(lambda: steps.init_state(spec, tx, 7)[1])()
  for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(constant), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_reused_jit_compiles_with_its_own_compiler_options():
  """`train.reused_jit` hands its `compiler_options` to XLA (an unknown option is refused when
  the function compiles) and keeps one jitted function per set of options."""
  add_one = lambda x: x + 1
  with pytest.raises(Exception, match="xla_no_such_option"):
    train.reused_jit(add_one, compiler_options={"xla_no_such_option": True})(jnp.ones(3))
  quick = train.reused_jit(add_one, compiler_options={"xla_backend_optimization_level": 0})
  assert quick is train.reused_jit(add_one,
                                   compiler_options={"xla_backend_optimization_level": 0})
  assert quick is not train.reused_jit(add_one)
  np.testing.assert_array_equal(quick(jnp.ones(3)), 2.0)


def test_the_schedule_given_to_each_update_is_the_optax_schedule():
  """`steps.scheduled_rate` against values worked by hand (peak 1e-2, end 1e-3, warmup 3,
  10 steps: a third of the peak at step 1, the peak at 3, halfway down the cosine at 6.5, the
  end from 10 on), and the optimizer that takes the values (with the weight decay and the
  clipping norm) with each update against the one with optax's schedule and them compiled in,
  through warmup, decay and past the end, clipping every step: the same updates and the same
  state tree (so checkpoints are alike)."""
  settings = steps.OptimizerSettings(learning_rate=1e-2, warmup_steps=3, final_lr_fraction=0.1,
                                     b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0)
  values = settings.step_values(10)
  for count, rate in [(0, 0.0), (1, 1e-2 / 3), (3, 1e-2), (6.5, 5.5e-3), (10, 1e-3), (25, 1e-3)]:
    np.testing.assert_allclose(steps.scheduled_rate(count, values), rate, rtol=1e-6, atol=1e-12)
  schedule, given = settings.make(10)
  compiled_in = steps.make_optimizer(schedule, 0.9, 0.95, 0.1, 1.0)
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
  state, reference = given.init(params), compiled_in.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  update = jax.jit(lambda g, s, v: given.update(g, s, params, optimizer_values=v))
  for _ in range(13):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32), params)
    (got, state), (want, reference) = update(g, state, values), compiled_in.update(
        g, reference, params)
    for a, b in zip(jax.tree.leaves((got, state)), jax.tree.leaves((want, reference))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)   # float32 rounding
  assert settings.make(10)[1] is settings.make(99)[1] is steps.OptimizerSettings(
      learning_rate=3.0, warmup_steps=1, final_lr_fraction=0.0, b1=0.9, b2=0.95,
      weight_decay=0.3, grad_clip_norm=0.5).make(5)[1]   # one optimizer for all those values


def test_resume_with_other_model_sizes_is_refused(tiny_config, tmp_path):
  config = _config(tiny_config, steps=6, eval_every=100, checkpoint_every=100, sample_tokens=0)
  train_and_evaluate(config, tmp_path)
  config.model.d_model = 96
  with pytest.raises(CheckpointMismatch, match="model.d_model"):
    train_and_evaluate(config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64


def test_aux_losses_add_up_with_their_coefficients(tiny_config):
  """The MoE layers give Switch, sequence-wise and z-losses without coefficients; the loss adds
  them times the run's (`routing.BalancingValues`, an argument of the step), and they reach
  the router."""
  tiny_config.router.score_function = "softmax"
  graphdef, state = steps.init_state(ModelSpec.from_config(tiny_config),
                                     steps.make_optimizer(0.0, 0.9, 0.95, 0.0, 1.0), 0)
  batch = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 33)), jnp.int32)
  balancing = routing.BalancingValues.of(BalancingSettings(
      switch_loss_alpha=0.1, sequence_loss_alpha=0.01, z_loss_coef=1e-3))
  loss, (cross_entropy, stats, _) = jax.jit(steps.loss_fn, static_argnums=2)(
      state.params, state.biases, graphdef, batch, 0.0, balancing)
  assert 0.9 < float(stats.switch_loss[0]) < 2.0     # near 1 for a near-uniform router
  assert 0.9 < float(stats.sequence_loss[0]) < 2.0
  assert 0 < float(stats.z_loss[0]) < 10.0
  aux = 0.1 * stats.switch_loss + 0.01 * stats.sequence_loss + 1e-3 * stats.z_loss
  np.testing.assert_allclose(loss, cross_entropy + aux.sum(), rtol=1e-6)
  unweighted = steps.loss_fn(state.params, state.biases, graphdef, batch)[0]
  np.testing.assert_allclose(unweighted, cross_entropy, rtol=1e-6)   # no values: no aux loss
  aux_only = lambda p: jnp.sum(sum(steps.loss_fn(p, state.biases, graphdef, batch)[1][1][2:5]))
  grads = jax.jit(jax.grad(aux_only))(state.params)
  router_grads = [g for path, g in nnx.to_flat_state(grads) if path[-1] == "router_kernel"]
  assert router_grads and all(float(jnp.abs(g).max()) > 0 for g in router_grads)


def test_bias_freezes_after_the_configured_step(tiny_config):
  o = tiny_config.optimizer
  tx = steps.make_optimizer(steps.make_schedule(o.learning_rate, 1, 10, 0.1), 0.9, 0.95, 0.0, 1.0)
  graphdef, state = steps.init_state(ModelSpec.from_config(tiny_config), tx, 0)
  balancing = routing.BalancingValues.of(BalancingSettings(bias_update_rate=1e-2,
                                                            bias_freeze_step=2))
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx))
  rng = np.random.default_rng(3)
  biases = []
  for _ in range(4):
    state, _ = step(state, jnp.asarray(rng.integers(0, 256, (8, 33)), jnp.int32), None, None,
                    balancing)
    biases.append(np.asarray(jax.tree.leaves(state.biases)[0]))
  assert not np.array_equal(biases[0], biases[1])          # steps 1 and 2 update
  np.testing.assert_array_equal(biases[1], biases[2])       # steps 3 and 4 do not
  np.testing.assert_array_equal(biases[2], biases[3])


@pytest.mark.parametrize("router, dispatcher", [("softmax", "capacity"),
                                                ("expert_choice", "capacity"),
                                                ("sigmoid", "dropless"), ("sigmoid", "dense")])
def test_other_routers_and_dispatchers_train(tiny_config, tmp_path, router, dispatcher):
  tiny_config.router.score_function, tiny_config.dispatch.strategy = router, dispatcher
  b = tiny_config.balancing
  if router != "sigmoid":
    b.bias_update_rate, b.sequence_loss_alpha = 0.0, 0.0
  b.switch_loss_alpha = 1e-2 if router == "softmax" else 0.0
  config = _config(tiny_config, steps=12, log_every=6, eval_every=12, checkpoint_every=100,
                   sample_tokens=0)
  final = train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in _metrics(tmp_path) if "loss" in r]
  assert np.isfinite(final["validation_loss"]) and losses[-1] < losses[0]


def test_optimizer_moments_in_bf16_are_stored_so_and_update_as_optax_does():
  """optimizer.moment_dtype: float32 is optax.adamw itself (same state tree and updates);
  bfloat16 stores both moments in bf16, and each step is optax.adamw's step from the same
  moments in float32, its new moments rounded to bf16."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32),
                        params) for _ in range(3)]
  decay_mask = lambda ps: jax.tree.map(lambda p: p.ndim >= 2, ps)
  optax_adamw = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))
  as_float32 = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)

  ours = steps.make_optimizer(1e-2, 0.9, 0.95, 0.1, 1.0)
  state, reference = ours.init(params), optax_adamw.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  for g in grads:
    (got, state), (want, reference) = ours.update(g, state, params), optax_adamw.update(
        g, reference, params)
    for a, b in zip(jax.tree.leaves((got, state)), jax.tree.leaves((want, reference))):
      np.testing.assert_array_equal(a, b)

  bf16 = steps.make_optimizer(1e-2, 0.9, 0.95, 0.1, 1.0, jnp.bfloat16)
  state = bf16.init(params)
  adam = state[1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  for g in grads:
    want, want_state = optax_adamw.update(g, as_float32(state), params)
    got, state = bf16.update(g, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
      assert a.dtype == (jnp.bfloat16 if b.dtype == jnp.float32 else b.dtype)
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b.astype(a.dtype), np.float32))
