"""Corpora, their tokenization and grain pipelines.

Four sources, one shape of result (`Corpus`: a train and a validation token stream plus a
manifest that identifies the data exactly):
  * "stdlib": the Python standard library source of the running interpreter (found through
    `sysconfig`), the embedded default corpus: every machine with Python has it.
  * "python": every .py file the interpreter can import: the standard library plus the
    installed packages (its site-packages directories; a few hundred MB where the test extras
    are installed). Validation is exactly the "stdlib" source's validation split, so the two
    are measured on the same text; every package file is training data, less exact copies of
    a validation file. The manifest names each installed package and its version.
  * "text": a user's text files, a directory (searched recursively) or a glob.
  * "documents": JSONL, Parquet or ArrayRecord shards whose records hold a text field
    (moe_jax/documents.py); documents split by a hash of "<shard>#<record index>".
  * "tokens": a pre-tokenized binary file of uint16 or uint32 ids, read through a memmap.
Text is tokenized by `data.tokenizer` (moe_jax/tokenizer.py: raw bytes, or a byte-level BPE
learned from the training split and kept in the workdir); one BOS starts every file. Files
split into train/validation by a hash of their relative path, so the split does not move when
files are added. Training windows of seq_len + 1 tokens come through a grain
pipeline, sharded by process, shuffled per epoch; its iterator state is a small dict saved
with every checkpoint.
"""

import dataclasses
import fnmatch
import glob
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from moe_jax import documents
from moe_jax import tokenizer as tokenization
from moe_jax.settings import Settings
from moe_jax.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"   # a BPE run's tokenizer, in its workdir
CACHE_FORMAT = 1                    # of data.cache_dir's entries
SOURCES = ("stdlib", "python", "text", "documents", "tokens")
EMBEDDED_SOURCES = ("stdlib", "python")   # found on every machine with Python: no data.path


@dataclasses.dataclass(frozen=True)
class DataSettings(Settings):
  """Which text, how it is tokenized and split, and the batches it is cut into (`data`)."""

  SECTION = "data"

  source: str = "stdlib"        # a name of SOURCES
  path: str = ""                # "text"/"documents": a directory or a glob; "tokens": a file
  text_field: str = "text"      # "documents": the field of each record that holds its text
  tokenizer: str = "bpe"        # text: a name of tokenizer.KINDS
  tokenizer_file: str = ""      # "bpe": a tokenizer.json to use instead of learning one
  token_dtype: str = "uint16"   # "tokens" only: uint16 | uint32
  validation_percent: int = 5   # share of files (text) or of the token stream held out
  seq_len: int = 128            # tokens per training sequence
  batch_size: int = 16          # global batch, in sequences
  shuffle_seed: int = 0
  cache_dir: str = ""           # text: keep tokenized corpora here, by content ("": none)

  def problems(self) -> list[str]:
    problems = []
    need = lambda ok, message: ok or problems.append(message)
    need(self.tokenizer in tokenization.KINDS,
         f"data.tokenizer={self.tokenizer!r} is unknown; choose from {list(tokenization.KINDS)}")
    need(self.source != "tokens" or self.tokenizer == "bytes",
         f"data.tokenizer={self.tokenizer!r} does nothing with data.source='tokens' (the file "
         f"holds token ids already): leave data.tokenizer at 'bytes'")
    need(self.source in SOURCES,
         f"data.source={self.source!r} is unknown; choose from {list(SOURCES)}")
    need(self.source in EMBEDDED_SOURCES or bool(self.path),
         f"data.path is required when data.source={self.source!r}")
    need(self.token_dtype in ("uint16", "uint32"),
         f"data.token_dtype={self.token_dtype!r}: uint16 or uint32")
    need(0 < self.validation_percent < 100,
         f"data.validation_percent={self.validation_percent} must be between 1 and 99")
    need(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be >= 2")
    need(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
    need(self.shuffle_seed >= 0, f"data.shuffle_seed={self.shuffle_seed} must be >= 0")
    need(bool(self.text_field), "data.text_field is empty: name the records' text field")
    need(not self.tokenizer_file or self.tokenizer == "bpe",
         f"data.tokenizer_file={self.tokenizer_file!r} is a BPE: it needs data.tokenizer='bpe', "
         f"not {self.tokenizer!r}")
    return problems


class DataError(ValueError):
  """The data cannot be used as configured; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray          # 1-D token ids
  validation: np.ndarray     # 1-D token ids
  manifest: dict             # what the data is: source, sizes, content hash, tokenizer
  tokenizer: Tokenizer | None  # text corpora; None for token files (no bits per byte)


# ---------------------------------------------------------------------------------------------
# Loading


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


PACKAGE_DIRECTORIES = ("site-packages", "dist-packages")   # third-party code, not the stdlib's


def python_files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
  """Every .py file under `root`, sorted, not entering directories named in `skip` nor links
  to directories (as `root.rglob("*.py")` filtered afterwards gives them, but without walking
  the skipped trees: a standard library's site-packages can hold most of its files)."""
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [name for name in subdirs if name not in skip]
    found += [Path(directory) / name for name in names if name.endswith(".py")]
  return sorted(found)


def stdlib_files(root: Path) -> list[Path]:
  """Every .py file of the standard library, without installed third-party packages."""
  return python_files(root, skip=PACKAGE_DIRECTORIES)


def package_roots() -> list[Path]:
  """The directories the interpreter's installed packages live in (site-packages)."""
  import site
  candidates = site.getsitepackages() + (
      [site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
  return [Path(p) for p in dict.fromkeys(candidates) if os.path.isdir(p)]


def package_files(roots: list[Path]) -> list[tuple[str, Path]]:
  """(name, path) of every .py file under the package directories, named
  "packages/<path under its directory>"; a name found under two directories counts once."""
  named = {}
  for root in roots:
    for path in python_files(root):
      if path.is_file():
        named.setdefault("packages/" + path.relative_to(root).as_posix(), path)
  return sorted(named.items())


def installed_packages(roots: list[Path]) -> dict[str, str]:
  """{distribution name: version} of the packages installed in `roots`."""
  from importlib import metadata
  found = {d.metadata["Name"]: d.version
           for d in metadata.distributions(path=[str(r) for r in roots]) if d.metadata["Name"]}
  return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def text_files(path: str) -> tuple[Path, list[Path]]:
  """The files of a directory (recursively) or of a glob, and the root their names are relative
  to. Symbolic links to directories are followed once: a link loop or two links to one file
  never count a file twice (a file under two names could land in both splits)."""
  if not path:
    raise DataError("data.path is empty: data.source='text' needs a directory or a glob")
  if os.path.isdir(path):
    root = Path(path)
    files = _unique(walk_files(root))
  elif "**" in path:
    parts = Path(path).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:first_magic]) if first_magic else Path(".")
    files = _unique(f for f in walk_files(base)
                    if _glob_match(f.relative_to(base).parts, parts[first_magic:]))
  else:   # no recursion, so no loop; two names of one file are still counted once
    files = _unique(Path(p) for p in glob.glob(path) if os.path.isfile(p))
  if not os.path.isdir(path):
    root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
  if not files:
    raise DataError(f"data.path={path!r} matched no files")
  return root, files


def _unique(paths) -> list[Path]:
  """`paths` without a second name for the same file (a name that is not a link is kept)."""
  kept = {}
  for p in sorted(paths, key=lambda p: (os.path.islink(p), str(p))):
    kept.setdefault(os.path.realpath(p), p)
  return sorted(kept.values())


def walk_files(base: Path) -> list[Path]:
  """Every file under `base`, following directory links but entering each real directory once
  (a link loop ends there)."""
  seen_dirs, files = set(), []
  for directory, subdirs, names in os.walk(base, followlinks=True):
    real = os.path.realpath(directory)
    if real in seen_dirs:
      subdirs[:] = []
      continue
    seen_dirs.add(real)
    subdirs.sort()
    files += [Path(directory) / n for n in names if os.path.isfile(os.path.join(directory, n))]
  return files


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
  """Whether path components match glob components, `**` standing for any number of
  directories; names starting with '.' match only patterns that do, as in `glob`."""
  if not pattern:
    return not parts
  head, rest = pattern[0], pattern[1:]
  if head == "**":
    return any(_glob_match(parts[k:], rest) for k in range(len(parts) + 1)
               if not any(p.startswith(".") for p in parts[:k]))
  return (bool(parts) and fnmatch.fnmatchcase(parts[0], head)
          and (head.startswith(".") or not parts[0].startswith("."))
          and _glob_match(parts[1:], rest))


def _path_hash(relative: str) -> int:
  return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16)


def held_out_by_name(names: list[str], validation_percent: int) -> list[bool]:
  """Whether each name's item is held out, by a hash of the name. If no hash falls in the
  held-out share (tiny corpora), the smallest is held out, and if all do, the largest is not,
  so both splits have an item while there are two or more."""
  hashes = [_path_hash(n) for n in names]
  held_out = [h % 100 < validation_percent for h in hashes]
  if not any(held_out):
    held_out[int(np.argmin(hashes))] = True
  if all(held_out):
    held_out[int(np.argmax(hashes))] = False
  return held_out


def split_by_file(root: Path, files: list[Path], validation_percent: int) -> tuple[list, list]:
  """Deterministic split: a file is held out when the hash of its relative path says so
  (`held_out_by_name`), so the split does not move when files are added."""
  if len(files) < 2:
    raise DataError(f"{len(files)} file(s) under {root}: a split by file needs at least 2")
  files = sorted(files)
  relative = [p.relative_to(root).as_posix() for p in files]
  held_out = held_out_by_name(relative, validation_percent)
  train = [(r, p) for r, p, v in zip(relative, files, held_out) if not v]
  validation = [(r, p) for r, p, v in zip(relative, files, held_out) if v]
  return train, validation


def _refuse_binary(path: Path, content: bytes) -> None:
  """Text never holds a NUL byte; a file that does is an image, archive or token file."""
  offset = content.find(b"\0", 0, 1 << 16)
  if offset >= 0:
    raise DataError(f"{path} looks binary (a NUL byte at offset {offset}): data.source='text' "
                    f"reads text files; remove it, narrow data.path (for example a '*.txt' glob), "
                    f"or use data.source='tokens' for a file of token ids")


def _read_files(named_files: list[tuple[str, Path]], refuse_binary: bool) -> list[bytes]:
  """Each file's bytes."""
  contents = []
  for relative, path in named_files:
    try:
      content = path.read_bytes()
    except OSError as error:
      raise DataError(f"{path} cannot be read ({error.strerror or error})") from None
    if refuse_binary:
      _refuse_binary(path, content)
    contents.append(content)
  return contents


def _digest(named_files: list[tuple[str, Path]], contents: list[bytes], digest) -> None:
  """Feeds each file's name and content into `digest`."""
  for (relative, _), content in zip(named_files, contents):
    digest.update(relative.encode() + b"\0" + content + b"\0")


def _token_stream(contents: list[bytes], tokenizer: Tokenizer) -> np.ndarray:
  """BOS + the tokens of each file, concatenated."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  pieces = []
  for ids in tokenizer.encode_many(contents):
    pieces += [np.array([tokenizer.bos_id], dtype), ids.astype(dtype)]
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def make_tokenizer(kind: str, vocab_size: int, train_files: list[bytes],
                   saved: Path | None) -> Tokenizer:
  """The `data.tokenizer` of a run: bytes, the BPE saved in its workdir (a resumed run), or a
  BPE learned from the training files."""
  if kind not in tokenization.KINDS:
    raise DataError(f"data.tokenizer={kind!r}: expected one of {list(tokenization.KINDS)}")
  saved = saved if saved is not None and saved.exists() else None
  if kind == "bytes":
    if saved:
      raise DataError(f"there is a BPE tokenizer ({saved}) but data.tokenizer='bytes': set "
                      f"data.tokenizer='bpe' to use it (or resume with it), or use a new --workdir")
    return tokenization.byte_tokenizer()
  if not saved:
    return tokenization.train_bpe(train_files, vocab_size)
  tokenizer = _saved_bpe(saved)
  if tokenizer.vocab_size > vocab_size:
    raise DataError(f"the tokenizer {saved} has {tokenizer.vocab_size} ids, more than "
                    f"model.vocab_size={vocab_size}")
  return tokenizer


def _saved_bpe(path: Path) -> Tokenizer:
  """The BPE a run saved in its workdir; DataError when it cannot be read or used."""
  try:
    return tokenization.load_bpe(path)
  except tokenization.TokenizerError as error:   # a missing or unreadable file included
    raise DataError(str(error)) from None


def _tokenized(cache_dir: str, corpus_digest: str, kind: str, vocab_size: int,
               saved: Path | None, train_contents: list[bytes],
               validation_contents: list[bytes]) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
  """(tokenizer, train stream, validation stream); with `cache_dir`, read from the entry named
  by a hash of the text and the tokenizer (a saved one, or one learned from this text) when
  there, else made and written there."""
  learned = kind == "bpe" and not (saved is not None and saved.exists())
  chosen = None if learned else make_tokenizer(kind, vocab_size, [], saved)   # its checks too
  tokenizer_id = f"bpe learned, {vocab_size} ids" if learned else chosen.digest
  entry = (Path(cache_dir) / hashlib.sha256(
      f"{CACHE_FORMAT}|{corpus_digest}|{tokenizer_id}".encode()).hexdigest()
           if cache_dir else None)
  if entry is not None and entry.is_dir():
    chosen = _saved_bpe(entry / TOKENIZER_FILE) if learned else chosen
    return (chosen, np.load(entry / "train.npy", mmap_mode="r"),
            np.load(entry / "validation.npy", mmap_mode="r"))
  chosen = chosen or make_tokenizer(kind, vocab_size, train_contents, saved)
  train = _token_stream(train_contents, chosen)
  validation = _token_stream(validation_contents, chosen)
  if entry is not None:
    _write_cache_entry(entry, chosen, train, validation)
  return chosen, train, validation


def _write_cache_entry(entry: Path, chosen: Tokenizer, train, validation) -> None:
  """Writes a cache entry whole or not at all (processes writing the same entry at once: the
  first rename wins, the others' copies are dropped)."""
  partial = None
  try:
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=entry.name + ".partial.", dir=entry.parent))
    np.save(partial / "train.npy", train)
    np.save(partial / "validation.npy", validation)
    chosen.save(partial / TOKENIZER_FILE)
    os.rename(partial, entry)
  except OSError as error:
    if not entry.is_dir():
      raise DataError(f"data.cache_dir={str(entry.parent)!r} cannot hold the tokenized corpus "
                      f"({error.strerror or error})") from None
  finally:
    if partial is not None:
      shutil.rmtree(partial, ignore_errors=True)


def load_text_corpus(root: Path, files: list[Path], validation_percent: int, source: str,
                     tokenizer: str, vocab_size: int, saved_tokenizer: Path | None,
                     package_roots: list[Path] = (), cache_dir: str = "") -> Corpus:
  """Files split by path; with `package_roots` ("python"), every package file joins the
  training split unless its content is that of a validation file. With `cache_dir`, the
  tokenized streams (and a learned tokenizer) are kept there under a hash of the text and
  the tokenizer, and read back instead of tokenizing again."""
  train_files, validation_files = split_by_file(root, files, validation_percent)
  refuse_binary = source == "text"   # the embedded corpora are known text
  train_contents = _read_files(train_files, refuse_binary)
  validation_contents = _read_files(validation_files, refuse_binary)
  extra = {}
  if package_roots:
    held_out = {hashlib.sha256(c).digest() for c in validation_contents if c}   # empty: no text
    named = package_files(package_roots)
    contents = _read_files(named, refuse_binary)
    kept = [hashlib.sha256(c).digest() not in held_out for c in contents]
    train_files += [f for f, k in zip(named, kept) if k]
    train_contents += [c for c, k in zip(contents, kept) if k]
    extra = {"package_roots": [str(r) for r in package_roots],
             "package_files": sum(kept), "package_copies_of_validation_files": kept.count(False),
             "packages": installed_packages(package_roots)}
  return tokenized_corpus(source, root, train_files, train_contents, validation_files,
                          validation_contents, tokenizer, vocab_size, saved_tokenizer, cache_dir,
                          extra)


def load_document_corpus(root: Path, shards: list[Path], text_field: str,
                         validation_percent: int, tokenizer: str, vocab_size: int,
                         saved_tokenizer: Path | None, cache_dir: str = "") -> Corpus:
  """Every record's text of every shard, each a document named "<shard>#<index>", split by a
  hash of that name."""
  names, texts = [], []
  for shard in shards:
    try:
      found = documents.read_documents(shard, text_field)
    except documents.DocumentError as error:
      raise DataError(str(error)) from None
    relative = shard.relative_to(root).as_posix()
    names += [f"{relative}#{i}" for i in range(len(found))]
    texts += found
  if len(names) < 2:
    raise DataError(f"{len(names)} document(s) under {root}: a split needs at least 2")
  held_out = held_out_by_name(names, validation_percent)
  pick = lambda held: ([(n, None) for n, h in zip(names, held_out) if h == held],
                       [t for t, h in zip(texts, held_out) if h == held])
  (train_names, train_texts), (validation_names, validation_texts) = pick(False), pick(True)
  return tokenized_corpus("documents", root, train_names, train_texts, validation_names,
                          validation_texts, tokenizer, vocab_size, saved_tokenizer, cache_dir,
                          {"text_field": text_field, "shards": len(shards)})


def tokenized_corpus(source: str, root: Path, train_names: list, train_contents: list[bytes],
                     validation_names: list, validation_contents: list[bytes], tokenizer: str,
                     vocab_size: int, saved_tokenizer: Path | None, cache_dir: str,
                     extra: dict) -> Corpus:
  """The Corpus of split texts (`*_names`: (name, path) pairs, names hashed into the digest):
  tokenized, one BOS before each text, with its manifest."""
  digest = hashlib.sha256()
  _digest(train_names, train_contents, digest)
  _digest(validation_names, validation_contents, digest)
  train_bytes = sum(map(len, train_contents))
  validation_bytes = sum(map(len, validation_contents))
  if train_bytes + validation_bytes == 0:
    raise DataError(f"the {len(train_names) + len(validation_names)} texts under {root} are all "
                    f"empty")
  chosen, train, validation = _tokenized(cache_dir, digest.hexdigest(), tokenizer, vocab_size,
                                         saved_tokenizer, train_contents, validation_contents)
  manifest = {
      "source": source, "root": str(root),
      "python_version": sys.version.split()[0],
      "file_count": len(train_names) + len(validation_names),
      "bytes": train_bytes + validation_bytes,
      "train_files": len(train_names), "validation_files": len(validation_names),
      "train_bytes": train_bytes, "validation_bytes": validation_bytes,
      "train_tokens": int(train.size), "validation_tokens": int(validation.size),
      "sha256": digest.hexdigest(),
      "tokenizer": {"kind": chosen.kind, "vocab_size": chosen.vocab_size,
                    "sha256": chosen.digest},
      **extra,
  }
  return Corpus(train, validation, manifest, chosen)


def load_token_file(path: str, dtype: str, validation_percent: int, vocab_size: int) -> Corpus:
  """A flat binary file of token ids; the last `validation_percent` of it is held out."""
  if dtype not in ("uint16", "uint32"):
    raise DataError(f"data.token_dtype={dtype!r}: expected 'uint16' or 'uint32'")
  if not os.path.isfile(path):
    raise DataError(f"data.path={path!r}: no such token file")
  itemsize = np.dtype(dtype).itemsize
  size = os.path.getsize(path)
  if size == 0 or size % itemsize:
    raise DataError(f"token file {path} has {size} bytes, not a positive multiple of {itemsize} "
                    f"({dtype})")
  tokens = np.memmap(path, dtype=dtype, mode="r")
  largest = int(tokens.max())
  if largest >= vocab_size:
    raise DataError(f"token file {path} holds id {largest}, but model.vocab_size={vocab_size}")
  cut = len(tokens) - max(1, len(tokens) * validation_percent // 100)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  manifest = {"source": "tokens", "path": str(path), "dtype": dtype,
              "python_version": sys.version.split()[0], "file_count": 1, "bytes": size,
              "train_tokens": cut, "validation_tokens": len(tokens) - cut,
              "sha256": digest.hexdigest()}
  return Corpus(tokens[:cut], tokens[cut:], manifest, None)


def load_corpus(source: str, path: str, token_dtype: str, validation_percent: int,
                vocab_size: int, tokenizer: str = "bytes",
                saved_tokenizer: Path | None = None, cache_dir: str = "",
                text_field: str = "text") -> Corpus:
  """Loads the configured corpus; raises DataError with the reason when it cannot be used.

  Text is tokenized by `tokenizer` ("bytes" or "bpe"); a BPE is read from `saved_tokenizer`
  when that file exists (a run's workdir), else learned from the training split."""
  if source == "tokens":
    return load_token_file(path, token_dtype, validation_percent, vocab_size)
  roots = []
  if source in EMBEDDED_SOURCES:
    root = stdlib_root()
    files = stdlib_files(root)
    if not files:
      raise DataError(f"no .py files under the standard library at {root}")
    if source == "python":
      roots = package_roots()
  elif source == "text":
    root, files = text_files(path)
  elif source == "documents":
    root, shards = text_files(path)
    return load_document_corpus(root, shards, text_field, validation_percent, tokenizer,
                                vocab_size, saved_tokenizer, cache_dir)
  else:
    raise DataError(f"data.source={source!r}: expected one of {list(SOURCES)}")
  return load_text_corpus(root, files, validation_percent, source, tokenizer, vocab_size,
                          saved_tokenizer, roots, cache_dir)


def configured_corpus(section, vocab_size: int, saved_tokenizer: Path | None = None) -> Corpus:
  """`load_corpus` for a config's `data` section (a run's, or one saved by an older run that
  lacks the newer fields: their defaults), with the BPE of `bpe_file`."""
  return load_corpus(section.source, section.path, section.token_dtype,
                     section.validation_percent, vocab_size, section.get("tokenizer", "bytes"),
                     bpe_file(section.get("tokenizer_file", ""), saved_tokenizer),
                     section.get("cache_dir", ""), section.get("text_field", "text"))


def bpe_file(given: str, in_workdir: Path | None) -> Path | None:
  """The BPE file a run reads: its workdir's (a resumed run), else `data.tokenizer_file`
  (`given`; a new run copies it into its workdir). A workdir tokenizer that differs from the
  given file is refused; a new run's given file must exist."""
  if in_workdir is not None and in_workdir.exists():
    if given and Path(given).is_file() and (_saved_bpe(Path(given)).digest
                                            != _saved_bpe(in_workdir).digest):
      raise DataError(f"data.tokenizer_file={given!r} differs from the tokenizer this run was "
                      f"started with ({in_workdir}): resume without it, or use a new --workdir")
    return in_workdir
  if given and not Path(given).is_file():
    raise DataError(f"data.tokenizer_file={given!r}: no such file")
  return Path(given) if given else in_workdir


def run_tokenizer(source: str, tokenizer: str, workdir: Path) -> Tokenizer | None:
  """The tokenizer a finished or running run in `workdir` used (None: it read token ids)."""
  if source == "tokens":
    return None
  if tokenizer == "bytes":
    return tokenization.byte_tokenizer()
  return _saved_bpe(workdir / TOKENIZER_FILE)


# ---------------------------------------------------------------------------------------------
# Windows and pipelines


class Windows:
  """Random access to non-overlapping windows of seq_len + 1 tokens (inputs plus shifted targets)."""

  def __init__(self, tokens: np.ndarray, seq_len: int, split: str):
    self.tokens, self.seq_len = tokens, seq_len
    self.count = (len(tokens) - 1) // seq_len
    if self.count < 1:
      raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than data.seq_len + 1 = "
                      f"{seq_len + 1}: lower data.seq_len or add data")

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def train_dataset(windows: Windows, batch_per_process: int, seed: int, process_index: int,
                  process_count: int) -> grain.IterDataset:
  """Shuffled (a new order every epoch), endless batches: this process's contiguous share of
  each global batch. The global batches do not depend on the number of processes, so a run
  on N hosts sees the same data in the same order as on one."""
  global_batch = batch_per_process * process_count
  if len(windows) < global_batch:
    raise DataError(f"the train split has {len(windows)} windows, fewer than one batch "
                    f"({global_batch}): lower data.batch_size or add data")
  first = process_index * batch_per_process
  mine = lambda indices: np.stack([windows[i] for i in indices[first:first + batch_per_process]])
  return (grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat(None)
          .batch(global_batch, drop_remainder=True).map(mine).to_iter_dataset())


def evaluation_batch_count(requested: int, num_windows: int, global_batch: int) -> int:
  """`requested` batches, or with 0 as many whole batches as the split holds (at least one):
  every validation window but the last few that do not fill a batch."""
  return requested or max(1, num_windows // global_batch)


def evaluation_batches(windows: Windows, num_batches: int, batch_per_process: int,
                       process_index: int, process_count: int) -> Iterator[np.ndarray]:
  """The same validation batches every time: the first windows in order, wrapping if short;
  each process takes its contiguous share of each global batch."""
  global_batch = batch_per_process * process_count
  first = process_index * batch_per_process
  for b in range(num_batches):
    indices = (np.arange(global_batch) + b * global_batch) % len(windows)
    yield np.stack([windows[i] for i in indices[first:first + batch_per_process]])
