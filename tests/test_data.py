"""Corpora, the split, token files, errors for bad data, and the grain pipeline's state."""

import json

import numpy as np
import pytest

from moe_jax import data
from moe_jax.tokenizer import BYTE_BOS_ID


@pytest.fixture(scope="module")
def stdlib_corpus():
  return data.load_corpus("stdlib", "", "uint16", 5, 260)


def test_stdlib_corpus_and_manifest(stdlib_corpus):
  import sys
  m = stdlib_corpus.manifest
  assert m["python_version"] == sys.version.split()[0]
  assert m["file_count"] > 500 and m["bytes"] > 5_000_000
  assert m["train_files"] + m["validation_files"] == m["file_count"]
  assert m["train_tokens"] + m["validation_tokens"] == m["bytes"] + m["file_count"]  # + one BOS each
  assert 0.01 < m["validation_files"] / m["file_count"] < 0.15
  assert len(m["sha256"]) == 64
  json.dumps(m)
  assert stdlib_corpus.train.max() <= BYTE_BOS_ID and stdlib_corpus.tokenizer.kind == "bytes"


def test_python_corpus_adds_the_installed_packages_and_keeps_the_stdlib_validation(
    stdlib_corpus):
  from importlib import metadata
  corpus = data.load_corpus("python", "", "uint16", 5, 260)
  m, stdlib = corpus.manifest, stdlib_corpus.manifest
  # The same held-out text as the stdlib source, so the two are measured alike...
  np.testing.assert_array_equal(corpus.validation, stdlib_corpus.validation)
  assert m["validation_files"] == stdlib["validation_files"]
  # ...and training is the stdlib's training files, then every package file.
  np.testing.assert_array_equal(corpus.train[:stdlib_corpus.train.size], stdlib_corpus.train)
  assert m["train_files"] == stdlib["train_files"] + m["package_files"]
  assert m["train_bytes"] > 5 * stdlib["train_bytes"]
  assert m["train_tokens"] == m["train_bytes"] + m["train_files"]   # one BOS per file
  for name in ("jax", "numpy", "flax", "grain"):   # what the tests need is installed
    assert m["packages"][name] == metadata.version(name)
  json.dumps(m)


def test_a_package_copy_of_a_validation_file_stays_out_of_training(tmp_path, stdlib_corpus):
  root = data.stdlib_root()
  _, validation = data.split_by_file(root, data.stdlib_files(root), 5)
  site = tmp_path / "site-packages"
  (site / "vendored").mkdir(parents=True)
  (site / "vendored" / "copy.py").write_bytes(validation[0][1].read_bytes())
  (site / "mine.py").write_bytes(b"x = 1\n")
  corpus = data.load_text_corpus(root, data.stdlib_files(root), 5, "python", "bytes", 260,
                                 None, [site])
  m = corpus.manifest
  assert (m["package_files"], m["package_copies_of_validation_files"]) == (1, 1)
  assert corpus.train.size == stdlib_corpus.train.size + 1 + 6   # BOS + "x = 1\n"
  np.testing.assert_array_equal(corpus.train[-7:], [BYTE_BOS_ID, *b"x = 1\n"])
  np.testing.assert_array_equal(corpus.validation, stdlib_corpus.validation)


def test_python_files_are_rglobs_without_the_package_trees(tmp_path):
  """The walk that skips site-packages gives the files `rglob("*.py")` filtered afterwards
  gives: on a tree by hand (a link to a directory is not entered, as rglob does not) and on
  the running interpreter's standard library."""
  for name in ("a/b.py", "a/site-packages/x.py", "dist-packages/y.py", "c.txt", "d/e/f.py",
               "d/e/notes.pyc", "g.py"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("x = 1\n")
  (tmp_path / "link").symlink_to(tmp_path / "d")
  assert data.stdlib_files(tmp_path) == [tmp_path / n for n in ("a/b.py", "d/e/f.py", "g.py")]
  assert data.python_files(tmp_path / "a") == [tmp_path / "a/b.py",
                                                tmp_path / "a/site-packages/x.py"]
  root = data.stdlib_root()
  by_rglob = sorted(p for p in root.rglob("*.py")
                    if "site-packages" not in p.parts and "dist-packages" not in p.parts)
  assert data.stdlib_files(root) == by_rglob


def test_split_is_deterministic_and_disjoint(tmp_path):
  for i in range(40):
    (tmp_path / f"f{i}.txt").write_text(f"file {i}\n" * 10)
  root, files = data.text_files(str(tmp_path))
  train, validation = data.split_by_file(root, files, 20)
  assert {r for r, _ in train}.isdisjoint({r for r, _ in validation})
  assert len(train) + len(validation) == 40 and validation
  assert (train, validation) == data.split_by_file(root, list(reversed(files)), 20)
  # Adding files does not move existing ones between splits.
  (tmp_path / "new.txt").write_text("new")
  train2, validation2 = data.split_by_file(*data.text_files(str(tmp_path)), 20)
  assert {r for r, _ in validation} <= {r for r, _ in validation2}


def test_text_glob_tokenizes_bytes_with_bos(tmp_path):
  (tmp_path / "a.md").write_text("hello")
  (tmp_path / "b.md").write_text("wörld")
  (tmp_path / "c.txt").write_text("ignored")
  corpus = data.load_corpus("text", str(tmp_path / "*.md"), "uint16", 5, 260)
  assert corpus.manifest["file_count"] == 2
  everything = np.concatenate([corpus.train, corpus.validation])
  assert (everything == BYTE_BOS_ID).sum() == 2
  texts = sorted(corpus.tokenizer.text(chunk) for chunk in (corpus.train, corpus.validation))
  assert texts == ["hello", "wörld"]


def test_token_file(tmp_path):
  path = tmp_path / "tokens.bin"
  np.arange(1000, dtype=np.uint32).tofile(path)
  corpus = data.load_corpus("tokens", str(path), "uint32", 10, 1000)
  assert len(corpus.train) == 900 and corpus.validation[0] == 900 and corpus.tokenizer is None
  with pytest.raises(data.DataError, match="holds id 999, but model.vocab_size=500"):
    data.load_corpus("tokens", str(path), "uint32", 10, 500)
  (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
  with pytest.raises(data.DataError, match="not a positive multiple of 2"):
    data.load_corpus("tokens", str(tmp_path / "odd.bin"), "uint16", 10, 500)


def test_clear_errors_for_bad_data(tmp_path):
  with pytest.raises(data.DataError, match="matched no files"):
    data.load_corpus("text", str(tmp_path / "*.nothing"), "uint16", 5, 260)
  (tmp_path / "empty1.txt").write_text("")
  (tmp_path / "empty2.txt").write_text("")
  with pytest.raises(data.DataError, match="all empty"):
    data.load_corpus("text", str(tmp_path), "uint16", 5, 260)
  with pytest.raises(data.DataError, match="fewer than data.seq_len"):
    data.Windows(np.zeros(10, np.uint16), 64, "validation")


def test_windows_are_shifted_pairs():
  windows = data.Windows(np.arange(100, dtype=np.uint16), 8, "train")
  assert len(windows) == 12
  np.testing.assert_array_equal(windows[2], np.arange(16, 25))


def test_pipeline_state_restores_the_same_batches():
  windows = data.Windows(np.arange(2000, dtype=np.uint16), 8, "train")
  iterator = iter(data.train_dataset(windows, 4, seed=3, process_index=0, process_count=1))
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(data.train_dataset(windows, 4, seed=3, process_index=0, process_count=1))
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed), batch)


def test_processes_read_disjoint_windows():
  windows = data.Windows(np.arange(801, dtype=np.uint16), 8, "train")   # 100 windows
  seen = []
  for process in range(2):
    iterator = iter(data.train_dataset(windows, 10, seed=0, process_index=process, process_count=2))
    seen.append({int(b[0]) for _ in range(5) for b in next(iterator)})
  assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 100


def test_a_tokenized_corpus_is_kept_by_content_and_read_back(tmp_path):
  corpus_dir, cache = tmp_path / "text", tmp_path / "cache"
  corpus_dir.mkdir()
  for i in range(12):
    (corpus_dir / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
  load = lambda: data.load_corpus("text", str(corpus_dir), "uint16", 20, 300, "bpe", None,
                                  str(cache))
  first = load()
  [entry] = list(cache.iterdir())
  # The next load reads the entry instead of learning and encoding again (changed on purpose
  # here, so that reading it shows)...
  np.save(entry / "train.npy", np.asarray(first.train)[::-1])
  second = load()
  np.testing.assert_array_equal(second.train, np.asarray(first.train)[::-1])
  assert second.tokenizer.digest == first.tokenizer.digest
  assert second.manifest == first.manifest
  # ...and other text, or another tokenizer, is another entry.
  (corpus_dir / "f0.txt").write_text("changed\n")
  load()
  data.load_corpus("text", str(corpus_dir), "uint16", 20, 300, "bytes", None, str(cache))
  assert len(list(cache.iterdir())) == 3
  # A cached entry does not skip a tokenizer's checks: bytes where the workdir holds a BPE.
  saved = tmp_path / "tokenizer.json"
  first.tokenizer.save(saved)
  with pytest.raises(data.DataError, match="data.tokenizer='bytes'"):
    data.load_corpus("text", str(corpus_dir), "uint16", 20, 300, "bytes", saved, str(cache))


def _split_at_bos(stream) -> list[bytes]:
  """The texts of a byte-tokenized stream, each after its BOS."""
  texts, current = [], None
  for token in np.asarray(stream).tolist():
    if token == BYTE_BOS_ID:
      if current is not None:
        texts.append(bytes(current))
      current = []
    else:
      current.append(token)
  return texts + [bytes(current)]


def test_documents_from_jsonl_parquet_and_array_record_shards(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter
  docs = [f"document {i}: " + "é" * (i % 5) + "x" * i for i in range(36)]
  shards = tmp_path / "shards"
  shards.mkdir()
  (shards / "a.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n"
                                          for i, d in enumerate(docs[:12])), encoding="utf-8")
  pq.write_table(pa.table({"body": docs[12:24], "n": list(range(12))}), shards / "b.parquet")
  writer = ArrayRecordWriter(str(shards / "c.array_record"), "group_size:1")
  for d in docs[24:]:
    writer.write(json.dumps({"body": d}).encode())
  writer.close()
  corpus = data.load_corpus("documents", str(shards), "uint16", 20, 260, "bytes",
                            text_field="body")
  m = corpus.manifest
  encoded = [d.encode() for d in docs]
  assert (m["shards"], m["file_count"], m["bytes"]) == (3, 36, sum(map(len, encoded)))
  # Each document once, after its BOS, in the split its name "<shard>#<index>" hashes to.
  names = ([f"a.jsonl#{i}" for i in range(12)] + [f"b.parquet#{i}" for i in range(12)]
           + [f"c.array_record#{i}" for i in range(12)])
  held_out = data.held_out_by_name(names, 20)
  assert _split_at_bos(corpus.validation) == [e for e, h in zip(encoded, held_out) if h]
  assert _split_at_bos(corpus.train) == [e for e, h in zip(encoded, held_out) if not h]


@pytest.mark.parametrize("shard, content, message", [
    ("a.jsonl", '{"text": "one"}\n{"body": "two"}\n',
     "a.jsonl, line 2 has no field 'text' (its fields: 'body'); set data.text_field"),
    ("a.jsonl", '{"text": 3}\n', "a.jsonl, line 1: field 'text' holds int, not text"),
    ("a.jsonl", "", "a.jsonl holds no records: remove the empty shard"),
    ("a.csv", "text\nx\n", "a.csv: data.source='documents' reads .jsonl, .parquet"),
])
def test_bad_document_shards_are_refused_by_name(tmp_path, shard, content, message):
  (tmp_path / shard).write_text(content)
  (tmp_path / "z.jsonl").write_text('{"text": "fine"}\n')
  with pytest.raises(data.DataError) as refused:
    data.load_corpus("documents", str(tmp_path), "uint16", 20, 260, "bytes")
  assert message in str(refused.value)
