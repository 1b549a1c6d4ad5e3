"""Tokenizers: exact round trips (invalid UTF-8 included), bytes per id, word-bounded merges,
deterministic training, saved files, and bits per byte over the bytes the targets stand for."""

import math

import jax
import numpy as np
import pytest

from configs.default import get_config
from moe_jax import data, steps
from moe_jax import tokenizer as tokenization
from moe_jax.model import ModelSpec

FILES = [
    b"def add(a, b):\n    return a + b\n" * 20,
    "# caf\u00e9 \u2014 na\u00efve \U0001F600\nname = '\u00fcber'\n".encode() * 10,
    b"x = 1\r\nif x:\r\n\ty = [x, x]\r\n" * 10,
    b"latin-1 \xe9t\xe9 and a lone \xff byte, a cut \xe2\x82 euro\n" * 5,   # not UTF-8
]


@pytest.fixture(scope="module")
def bpe():
  return tokenization.train_bpe(FILES, 400)


def test_every_file_round_trips_and_ids_count_its_bytes(bpe):
  for tokenizer in (bpe, tokenization.byte_tokenizer()):
    for content in FILES + [b"", b"\x80\x81", "\u00e9".encode()[:1] + b"a"]:
      ids = tokenizer.encode(content)
      assert tokenizer.decode(ids) == content
      assert tokenizer.byte_counts[ids].sum() == len(content)
  assert bpe.byte_counts[bpe.pad_id] == bpe.byte_counts[bpe.bos_id] == 0
  assert len(bpe.encode(FILES[0])) < len(FILES[0]) / 2   # merges learned


def test_merges_stay_inside_words(bpe):
  pieces = [bpe.pieces[i] for i in bpe.encode(b"def add(a, b):\n    return a + b\n")]
  assert pieces == [b"def", b" add", b"(", b"a", b",", b" b", b"):", b"\n    ", b"return",
                    b" a", b" +", b" b", b"\n"]


def test_training_is_deterministic_and_the_saved_file_loads(bpe, tmp_path):
  assert tokenization.train_bpe(FILES, 400).json == bpe.json
  bpe.save(tmp_path / "tokenizer.json")
  loaded = tokenization.load_bpe(tmp_path / "tokenizer.json")
  assert loaded.pieces == bpe.pieces and loaded.digest == bpe.digest
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(tokenization.TokenizerError, match="is not a tokenizer.json"):
    tokenization.load_bpe(tmp_path / "bad.json")
  (tmp_path / "nobos.json").write_text(bpe.json.replace('"<bos>"', '"<start>"'))
  with pytest.raises(tokenization.TokenizerError, match="lacks"):
    tokenization.load_bpe(tmp_path / "nobos.json")


def test_bpe_corpus_holds_every_byte_of_the_split(tmp_path):
  for i, content in enumerate(FILES * 5):
    (tmp_path / f"f{i}.py").write_bytes(content)
  corpus = data.load_corpus("text", str(tmp_path), "uint16", 20, 400, "bpe")
  validation_files = corpus.manifest["validation_files"]
  assert validation_files > 0
  expected = sum((tmp_path / name).stat().st_size for name, _ in
                 data.split_by_file(*data.text_files(str(tmp_path)), 20)[1])
  counts = corpus.tokenizer.byte_counts
  assert counts[corpus.validation].sum() == expected == corpus.manifest["validation_bytes"]
  assert (corpus.validation == corpus.tokenizer.bos_id).sum() == validation_files


def test_bits_per_byte_divide_by_the_bytes_the_targets_stand_for(bpe):
  config = get_config("tiny")
  config.model.vocab_size = bpe.vocab_size
  spec = ModelSpec.from_config(config)
  tx = steps.make_optimizer(steps.make_schedule(1e-3, 1, 10, 0.1), 0.9, 0.95, 0.0, 1.0)
  graphdef, state = steps.init_state(spec, tx, 0)
  stream = np.concatenate([[bpe.bos_id], bpe.encode(FILES[1]), [bpe.bos_id], bpe.encode(FILES[3])])
  tokens = np.stack([stream[:33], stream[33:66]]).astype(np.int32)
  sums = jax.jit(lambda s, t: steps.eval_step(s, t, graphdef=graphdef,
                                               byte_counts=bpe.byte_counts))(state, tokens)
  target_bytes = sum(len(bpe.pieces[i]) for i in tokens[:, 1:].ravel())
  assert float(sums["bytes"]) == target_bytes and float(sums["targets"]) == 64
  summary = steps.summarize_evaluation(jax.device_get(sums))
  assert summary["validation_bits_per_byte"] == pytest.approx(
      float(sums["nats"]) / target_bytes / math.log(2))


def test_a_bpe_run_keeps_its_tokenizer_and_resumes_with_it(tmp_path, bpe):
  """Through the command line: a BPE run writes tokenizer.json and reports bits per byte; a
  resume reads the workdir's tokenizer (not a new one), and refuses the byte tokenizer; a
  run given data.tokenizer_file uses that file."""
  import json
  import subprocess
  import sys
  from tests.conftest import ROOT
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, content in enumerate(FILES * 6):
    (corpus / f"f{i}.py").write_bytes(content)
  workdir = tmp_path / "run"
  run = lambda steps, *args: subprocess.run(
      [sys.executable, "-m", "moe_jax.main", f"--config=configs/default.py:tiny,steps={steps}",
       f"--workdir={workdir}", "--config.data.source=text", f"--config.data.path={corpus}",
       "--config.data.tokenizer=bpe", "--config.model.vocab_size=400", "--config.data.seq_len=32",
       "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
       "--config.train.eval_batches=1", "--config.train.sample_tokens=8",
       "--config.optimizer.warmup_steps=1", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  first = run(4)
  assert first.returncode == 0, first.stderr[-2000:]
  learned = tokenization.load_bpe(workdir / "tokenizer.json")
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert 0 < final["validation_bits_per_byte"] < final["validation_loss"] / math.log(2)
  assert (workdir / "sample.txt").exists()
  # Another valid tokenizer of the same size in its place: the resume must use it.
  other = tokenization.train_bpe(FILES[:2], 400)
  assert other.digest != learned.digest
  other.save(workdir / "tokenizer.json")
  resumed = run(8, "--config.train.sample_tokens=0")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  manifest = json.loads((workdir / "data_manifest.json").read_text())
  assert manifest["tokenizer"]["sha256"] == other.digest
  refused = run(12, "--config.data.tokenizer=bytes", "--config.model.vocab_size=400")
  assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr[-2000:]
  assert "data.tokenizer='bytes'" in refused.stderr and "Traceback" not in refused.stderr
  # A given tokenizer.json: a new run uses it (and keeps a copy); a resume with another one is
  # refused, as is a file that does not exist.
  given = tmp_path / "given.json"
  other.save(given)        # not what learning from this corpus gives (`learned`)
  workdir = tmp_path / "given_run"
  started = run(4, f"--config.data.tokenizer_file={given}", "--config.train.sample_tokens=0")
  assert started.returncode == 0, started.stderr[-2000:]
  manifest = json.loads((workdir / "data_manifest.json").read_text())
  assert manifest["tokenizer"]["sha256"] == other.digest
  assert tokenization.load_bpe(workdir / "tokenizer.json").digest == other.digest
  learned.save(given)
  for path, workdir, expected in [
      (given, workdir, "differs from the tokenizer this run was started with"),
      (tmp_path / "none.json", tmp_path / "new_run", "no such file")]:
    refused = run(8, f"--config.data.tokenizer_file={path}")
    assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr[-2000:]
    assert f"data.tokenizer_file='{path}'" in refused.stderr and expected in refused.stderr
