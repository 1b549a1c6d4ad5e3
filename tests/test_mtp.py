"""Multi-token prediction: what each depth sees and predicts, its loss weight, and a run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import steps
from moe_jax.model import ModelSpec, Transformer
from moe_jax.train import train_and_evaluate


def _model(config, depth):
  config.model.mtp_depth = depth
  config.dispatch.strategy = "dropless"   # no capacity drops: positions stay independent
  return Transformer(ModelSpec.from_config(config), nnx.Rngs(params=0))


def test_depth_k_sees_tokens_up_to_i_plus_k_and_nothing_later(tiny_config):
  model = _model(tiny_config, 2)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  graphdef, state = nnx.split(model)
  with_mtp = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).with_mtp(tokens))
  features, stats, (depth1, depth2) = with_mtp(state, tokens)
  assert depth1.shape == (2, 15, model.spec.d_model) and depth2.shape[1] == 14
  assert stats.counts.shape[0] == len(model.moe_layers()) == 1 + 2   # one main MoE block + 2 MTP
  np.testing.assert_allclose(model(tokens)[0], model.logits(features), rtol=1e-5, atol=1e-5)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
  _, _, (new1, new2) = with_mtp(state, changed)
  for k, (old, new) in enumerate([(depth1, new1), (depth2, new2)], start=1):
    first_affected = 10 - k   # position i reads token i + k
    np.testing.assert_allclose(old[:, :first_affected], new[:, :first_affected], rtol=1e-5, atol=1e-5)
    assert not np.allclose(old[:, first_affected], new[:, first_affected])


def test_loss_adds_lambda_times_the_mean_depth_loss_and_its_schedule(tiny_config):
  model = _model(tiny_config, 2)
  graphdef, params, biases = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
  def depth_logits(params):
    model = nnx.merge(graphdef, params, biases)
    return [model.logits(features) for features in model.with_mtp(tokens[:, :-1])[2]]

  mtp_logits = jax.jit(depth_logits)(params)   # op by op this forward took 20 s on 2 CPU cores
  depth_losses = [optax.softmax_cross_entropy_with_integer_labels(l, tokens[:, k + 1:]).mean()
                  for k, l in enumerate(mtp_logits, start=1)]
  loss_fn = jax.jit(lambda p, w: steps.loss_fn(p, biases, graphdef, tokens, w))
  without, _ = loss_fn(params, 0.0)
  with_mtp, (_, _, metrics) = loss_fn(params, 0.3)
  np.testing.assert_allclose(with_mtp - without, 0.3 * (depth_losses[0] + depth_losses[1]) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["mtp_loss/depth2"], depth_losses[1], rtol=1e-6)
  accuracy = np.mean(np.argmax(mtp_logits[0], -1) == tokens[:, 2:])
  np.testing.assert_allclose(metrics["mtp_accuracy/depth1"], accuracy, rtol=1e-6)
  weights = steps.MTPWeights(0.3, 0.1, switch_step=5)
  assert [float(weights.at(s)) for s in (0, 4, 5, 9)] == pytest.approx([0.3, 0.3, 0.1, 0.1])
  # lambda = 0: the MTP modules get no gradient; lambda > 0: they do.
  grad_fn = jax.jit(jax.grad(lambda p, w: loss_fn(p, w)[0]))
  mtp_grad = lambda w: nnx.to_flat_state(grad_fn(params, w))
  norms = lambda grads: [float(jnp.abs(g[...]).max()) for path, g in grads if path[0] == "mtp"]
  assert max(norms(mtp_grad(0.0))) == 0 and min(norms(mtp_grad(0.3))) > 0


def test_a_run_with_scanned_layers_and_mtp_logs_each_depth_and_one_bias_row_per_moe_layer(
    tiny_config, tmp_path, monkeypatch):
  """A run with MTP of depth 2 logs each depth's loss (falling) and accuracy, and its loss is
  the cross-entropy plus lambda x the mean depth loss, lambda switching after the configured
  fraction of its steps; a second run of another length and other weights runs the same
  traced step (the weights are its arguments) and switches at its own step. routing.jsonl's
  bias and load have one row per MoE layer in the same order, the scanned stack's layers
  first, then the MTP blocks' (their bias had been logged as a ragged list of an [L, E] and
  [E] arrays, which failed at the first log)."""
  traces, original = [], steps.train_step
  monkeypatch.setattr(steps, "train_step",
                      lambda *args, **kwargs: traces.append(1) or original(*args, **kwargs))
  tiny_config.model.update(mtp_depth=2, scan_layers=True, num_layers=3)   # 2 MoE blocks
  tiny_config.balancing.sequence_loss_alpha = 0.0   # the loss: cross-entropy + lambda x MTP
  tiny_config.train.update(steps=20, log_every=1)
  rows_of = lambda workdir: [json.loads(line) for line in
                             (workdir / "metrics.jsonl").read_text().splitlines()]
  lambdas = lambda rows: [(r["loss"] - r["cross_entropy"])
                          / ((r["mtp_loss/depth1"] + r["mtp_loss/depth2"]) / 2)
                          for r in rows if "mtp_loss/depth2" in r]
  train_and_evaluate(tiny_config, tmp_path)
  rows = rows_of(tmp_path)
  np.testing.assert_allclose(lambdas(rows), [0.3] * 14 + [0.1] * 6, rtol=1e-4)   # 0.68 x 20
  tiny_config.model.update(mtp_loss_weight=0.5, mtp_loss_weight_final=0.2,
                           mtp_weight_switch_fraction=0.5)
  tiny_config.train.update(steps=12, sample_tokens=0, eval_every=100)
  train_and_evaluate(tiny_config, tmp_path / "shorter")
  assert len(traces) == 1, traces
  np.testing.assert_allclose(lambdas(rows_of(tmp_path / "shorter")), [0.5] * 6 + [0.2] * 6,
                             rtol=1e-4)
  logged = [r for r in rows if "mtp_loss/depth2" in r]
  assert logged and all(0 <= r[f"mtp_accuracy/depth{d}"] <= 1 for r in logged for d in (1, 2))
  assert logged[-1]["mtp_loss/depth1"] < logged[0]["mtp_loss/depth1"]
  assert all(np.isfinite(r["loss"]) for r in logged)
  details = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
  experts = tiny_config.model.num_routed_experts
  assert np.shape(details[-1]["bias"]) == np.shape(details[-1]["load"]) == (2 + 2, experts)
