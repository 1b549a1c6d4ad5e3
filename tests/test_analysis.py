"""The analysis functions the notebooks use, against hand-worked values and the model itself."""

import json
import jax
import numpy as np
import pytest

from moe_jax import analysis, data, steps
from moe_jax.analysis import CATEGORIES
from moe_jax.tokenizer import BYTE_BOS_ID

CODE = {c[0].upper(): i for i, c in enumerate(CATEGORIES)}   # K I W S C N P O
CODE["_"] = CODE["W"]


def _codes(spec: str) -> list[int]:
  return [CODE[c] for c in spec]


def test_python_bytes_are_categorized_by_the_tokenizer():
  source = b'if x1 == 2:  # hi\n    s = "a"\n'
  expected = "KK_II_PP_NP__CCCC_" + "____I_P_SSS_"
  assert len(expected) == len(source)
  np.testing.assert_array_equal(analysis.python_byte_categories(source), _codes(expected))


def test_multibyte_characters_keep_their_token_category():
  source = 'é = "é"\n'.encode()   # é is two bytes
  np.testing.assert_array_equal(analysis.python_byte_categories(source), _codes("II_P_SSSS_"))


def test_untokenizable_files_fall_back_to_character_classes():
  source = b'x = """abc\n'   # an unterminated triple-quoted string
  np.testing.assert_array_equal(analysis.python_byte_categories(source), _codes("I_P_PPPIII_"))


def test_stream_categories_follow_file_boundaries():
  first, second = b"x=1\n", b"# c\n"
  stream = np.concatenate([[BYTE_BOS_ID], list(first), [BYTE_BOS_ID], list(second)])
  np.testing.assert_array_equal(analysis.stream_categories(stream),
                                _codes("O" + "IPN_" + "O" + "CCC_"))


def test_category_expert_shares_by_hand():
  categories = np.array([[CODE["K"], CODE["K"], CODE["N"]]])
  ids = np.array([[[0, 1], [0, 2], [3, 3]]])
  shares = analysis.category_expert_shares(categories, ids, num_experts=4)
  np.testing.assert_allclose(shares[CODE["K"]], [0.5, 0.25, 0.25, 0.0])
  np.testing.assert_allclose(shares[CODE["N"]], [0.0, 0.0, 0.0, 1.0])
  assert shares[CODE["S"]].sum() == 0


def test_overlap_and_agreement_by_hand():
  ids = np.array([[[0, 1], [1, 2], [3, 4]]])
  # (1,2) keeps 1 of (0,1): 1/2; (3,4) keeps none of (1,2): 0.
  assert analysis.consecutive_overlap(ids) == pytest.approx(0.25)
  other = np.array([[[1, 0], [2, 5], [6, 7]]])
  assert analysis.topk_agreement(ids, other) == pytest.approx((1 + 0.5 + 0) / 3)
  assert analysis.topk_agreement(ids, ids) == 1.0


def test_expert_load_and_max_violation_by_hand():
  load = analysis.expert_load(np.array([[[[0, 0], [1, 2]]]]), num_experts=4)
  np.testing.assert_allclose(load, [[0.5, 0.25, 0.25, 0.0]])
  np.testing.assert_allclose(analysis.max_violation(load), [1.0])   # 0.5 / 0.25 - 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  analysis.train_tiny(workdir, "tiny,steps=12", log_every=4, eval_every=12, checkpoint_every=6,
                      checkpoints_to_keep=3, sample_tokens=0)
  return workdir


def test_trained_run_loads_at_every_checkpoint(tiny_run):
  assert analysis.checkpoint_steps(tiny_run) == [6, 12]
  early, final = analysis.load_run(tiny_run, 6), analysis.load_run(tiny_run)
  assert (early.step, final.step) == (6, 12)
  differs = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(early.params),
                                                      jax.tree.leaves(final.params))]
  assert all(differs)


def test_routing_trace_matches_the_models_own_counts(tiny_run):
  run = analysis.load_run(tiny_run)
  tokens = analysis.validation_batches(run, num_batches=1)[:, :-1]
  decisions = analysis.routing_trace(run, tokens)
  _, stats = steps.forward(run.graphdef, run.params, run.biases, tokens)
  assert len(decisions) == len(stats.counts) == 1
  ids = analysis.expert_ids(decisions)
  assert ids.shape == (1, *tokens.shape, run.config.router.top_k)
  counts = analysis.expert_load(ids, run.config.model.num_routed_experts) * ids[0].size
  np.testing.assert_allclose(counts, np.asarray(stats.counts), atol=1e-3)


def test_bias_history_ends_at_the_final_bias(tiny_run):
  history_steps, bias = analysis.bias_history(tiny_run)
  assert list(history_steps) == [4, 8, 12] and bias.shape == (3, 1, 8)
  final = np.stack(jax.tree.leaves(analysis.load_run(tiny_run).biases))
  np.testing.assert_allclose(bias[-1], final, atol=1e-6)
  assert np.abs(bias[-1]).sum() > 0
  metric_steps, values = analysis.metric_history(tiny_run, "max_violation")
  logged = [r for r in map(json.loads, open(tiny_run / "metrics.jsonl")) if "max_violation" in r]
  assert list(metric_steps) == [r["step"] for r in logged] == [4, 8, 12]
  np.testing.assert_array_equal(values, [r["max_violation"] for r in logged])
  with pytest.raises(ValueError, match=r"has 'max_violaton' \(yet\); its records have: .*"
                                       r"max_violation"):
    analysis.metric_history(tiny_run, "max_violaton")
  for read in (lambda: analysis.metric_history(tiny_run / "nope", "loss"),
               lambda: analysis.bias_history(tiny_run / "nope")):
    with pytest.raises(analysis.RunNotFound, match="nope holds no (metrics|routing).jsonl"):
      read()


def test_reading_a_run_leaves_a_checkpoint_being_written_alone(tiny_run):
  partial = tiny_run / "checkpoints" / "18.orbax-checkpoint-tmp"   # as a run still saving has
  partial.mkdir()
  try:
    assert analysis.checkpoint_steps(tiny_run) == [6, 12]
    assert analysis.load_run(tiny_run).step == 12
    assert partial.is_dir()
  finally:
    partial.rmdir()
