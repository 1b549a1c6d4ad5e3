"""Tokenizers: raw bytes, or a byte-level BPE trained on the training split.

Both turn any bytes into ids and back exactly (invalid UTF-8 included), and both know the
bytes each id stands for (`pieces`), so bits per byte means the same for either: validation
nats over the bytes their targets cover (`byte_counts`), never over the number of tokens.

  * "bytes": ids 0-255 are the bytes, then PAD_ID and BOS_ID.
  * "bpe": ids 0 and 1 are pad and bos, then the 256 single bytes, then learned merges, up to
    `model.vocab_size` ids. Trained with the `tokenizers` library on the training split's
    files (validation files never seen); text is first split into words by `WORD_PATTERN`
    (identifiers and numbers with one leading space, runs of punctuation, a newline with the
    indentation after it), so merges never cross a word. Saved as a standard `tokenizer.json`
    (a Hugging Face byte-level BPE tokenizer) in the run's workdir, and read back from there
    when the run resumes.
"""

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np

BYTE_PAD_ID, BYTE_BOS_ID = 256, 257
BPE_PAD, BPE_BOS = "<pad>", "<bos>"
MIN_VOCAB = 258   # 256 bytes + pad + bos
KINDS = ("bytes", "bpe")
WORD_PATTERN = r" ?[A-Za-z_][A-Za-z0-9_]*| ?[0-9]+| ?[^A-Za-z0-9_\s]+|\n[ \t]*|[^\S\n]+"
_INVALID_RUN = re.compile("([\udc80-\udcff]+)")   # invalid bytes under surrogateescape


class TokenizerError(ValueError):
  """A saved tokenizer cannot be used; the message says why."""


@functools.cache
def byte_level_alphabet() -> str:
  """The printable character that byte-level BPE writes for each byte value (GPT-2's table):
  printable Latin-1 bytes stand for themselves, the others take the characters from U+0100 on."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  chars, shifted = [], 0
  for value in range(256):
    if value in printable:
      chars.append(chr(value))
    else:
      chars.append(chr(256 + shifted))
      shifted += 1
  return "".join(chars)


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """Bytes <-> ids. `pieces[i]` is the bytes id i stands for (empty for pad and bos)."""
  kind: str
  pieces: tuple[bytes, ...]
  pad_id: int
  bos_id: int
  bpe: object = None         # the `tokenizers.Tokenizer` (kind "bpe")
  json: str = ""             # its saved form (kind "bpe")

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  @functools.cached_property
  def byte_counts(self) -> np.ndarray:
    """int32[vocab]: bytes each id stands for, the denominator of bits per byte."""
    return np.array([len(p) for p in self.pieces], np.int32)

  @functools.cached_property
  def _byte_ids(self) -> np.ndarray:
    """int32[256]: the id of each single byte."""
    ids = {piece: i for i, piece in enumerate(self.pieces) if len(piece) == 1}
    return np.array([ids[bytes([b])] for b in range(256)], np.int32)

  @property
  def digest(self) -> str:
    return hashlib.sha256(self.json.encode() if self.json else self.kind.encode()).hexdigest()

  def encode(self, content: bytes) -> np.ndarray:
    """Token ids (int32) of `content`, without bos."""
    return self.encode_many([content])[0]

  def encode_many(self, contents: list[bytes]) -> list[np.ndarray]:
    """`encode` of each item; the BPE encodes valid UTF-8 items in parallel."""
    if self.kind == "bytes":
      return [np.frombuffer(c, np.uint8).astype(np.int32) for c in contents]
    texts = [c.decode("utf-8", "surrogateescape") for c in contents]
    valid = [i for i, t in enumerate(texts) if not _INVALID_RUN.search(t)]
    result = [None] * len(contents)
    for i, encoding in zip(valid, self.bpe.encode_batch([texts[i] for i in valid])):
      result[i] = np.array(encoding.ids, np.int32)
    for i in set(range(len(contents))) - set(valid):
      result[i] = self._encode_with_invalid_bytes(texts[i])
    return result

  def _encode_with_invalid_bytes(self, text: str) -> np.ndarray:
    """Valid UTF-8 runs through the BPE, each byte that is not valid UTF-8 as its own id
    (`text` holds those bytes as surrogate escapes)."""
    ids = []
    for k, part in enumerate(_INVALID_RUN.split(text)):
      if k % 2:
        ids.extend(self._byte_ids[np.frombuffer(part.encode("utf-8", "surrogateescape"),
                                                np.uint8)].tolist())
      elif part:
        ids.extend(self.bpe.encode(part).ids)
    return np.array(ids, np.int32)

  def decode(self, ids) -> bytes:
    """The bytes `ids` stand for; pad, bos and ids outside the vocabulary are dropped."""
    return b"".join(self.pieces[i] for i in map(int, ids) if 0 <= i < len(self.pieces))

  def text(self, ids) -> str:
    return self.decode(ids).decode("utf-8", "replace")

  def save(self, path: Path) -> None:
    """Writes a BPE's tokenizer.json whole or not at all (bytes need no file)."""
    if self.kind == "bpe":
      partial = path.with_name(path.name + ".partial")
      partial.write_text(self.json)
      os.replace(partial, path)


def byte_tokenizer() -> Tokenizer:
  pieces = tuple(bytes([b]) for b in range(256)) + (b"", b"")
  return Tokenizer("bytes", pieces, BYTE_PAD_ID, BYTE_BOS_ID)


def _bpe_from(bpe) -> Tokenizer:
  """Wraps a trained or loaded byte-level BPE `tokenizers.Tokenizer`."""
  byte_of = {char: value for value, char in enumerate(byte_level_alphabet())}
  vocab = bpe.get_vocab(with_added_tokens=True)
  pieces = [b""] * len(vocab)
  for token, i in vocab.items():
    if token not in (BPE_PAD, BPE_BOS):
      pieces[i] = bytes(byte_of[char] for char in token)
  return Tokenizer("bpe", tuple(pieces), vocab[BPE_PAD], vocab[BPE_BOS], bpe, bpe.to_str())


def train_bpe(files: list[bytes], vocab_size: int) -> Tokenizer:
  """A byte-level BPE of at most `vocab_size` ids learned from `files` (deterministic)."""
  from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
  from tokenizers import Tokenizer as HFTokenizer
  bpe = HFTokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_PAD, BPE_BOS],
                                initial_alphabet=list(byte_level_alphabet()),
                                show_progress=False)
  bpe.train_from_iterator((f.decode("utf-8", "replace") for f in files), trainer=trainer)
  return _bpe_from(bpe)


def load_bpe(path: Path) -> Tokenizer:
  """A BPE saved by `Tokenizer.save`, or any byte-level BPE `tokenizer.json` with <pad>/<bos>."""
  from tokenizers import Tokenizer as HFTokenizer
  try:
    bpe = HFTokenizer.from_str(path.read_text())
    vocab = bpe.get_vocab(with_added_tokens=True)
    missing = [t for t in (BPE_PAD, BPE_BOS, *byte_level_alphabet()) if t not in vocab]
  except Exception as error:   # the library raises bare Exceptions for malformed files
    raise TokenizerError(f"{path} is not a tokenizer.json ({error})") from None
  if missing:
    raise TokenizerError(f"{path} is not a byte-level BPE with {BPE_PAD} and {BPE_BOS}: it lacks "
                         f"{len(missing)} of the tokens every id sequence needs, e.g. {missing[0]!r}")
  return _bpe_from(bpe)
