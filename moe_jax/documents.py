"""Documents from dataset shards: JSONL, Parquet or ArrayRecord files whose records each hold
a text field (`data.source='documents'`, `data.text_field`).

  * .jsonl: one JSON object per line.
  * .parquet: a table with a string column of that name (read with pyarrow, installed apart).
  * .array_record / .arrayrecord: each record a UTF-8 JSON object.

A document is named "<shard>#<record index>"; the split hashes those names, so it does not
move when shards are added, and the corpus packs the documents, one BOS before each, into
the same token stream as files (moe_jax/data.py).
"""

import json
from pathlib import Path

class DocumentError(ValueError):
  """A shard cannot be read as documents; the message names the shard and what to change."""


def _text(record, field: str, where: str) -> bytes:
  if not isinstance(record, dict):
    raise DocumentError(f"{where} is not a JSON object but {type(record).__name__}: each record "
                        f"needs a {field!r} field")
  if field not in record:
    fields = ", ".join(map(repr, list(record)[:8])) or "none"
    raise DocumentError(f"{where} has no field {field!r} (its fields: {fields}); set "
                        f"data.text_field to the field that holds the text")
  value = record[field]
  if not isinstance(value, str):
    raise DocumentError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
  return value.encode("utf-8")


def _jsonl(path: Path, field: str) -> list[bytes]:
  texts = []
  with open(path, encoding="utf-8") as lines:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise DocumentError(f"{path}, line {number}: not JSON ({error.msg})") from None
      texts.append(_text(record, field, f"{path}, line {number}"))
  return texts


def _parquet(path: Path, field: str) -> list[bytes]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DocumentError(f"{path} is a Parquet shard, and reading Parquet needs pyarrow: "
                        f"pip install pyarrow") from None
  try:
    table = pq.read_table(path)
  except Exception as error:   # pyarrow raises its own error types for malformed files
    raise DocumentError(f"{path} cannot be read as Parquet ({error})") from None
  if field not in table.column_names:
    raise DocumentError(f"{path} has no column {field!r} (its columns: "
                        f"{', '.join(map(repr, table.column_names))}); set data.text_field")
  values = table.column(field).to_pylist()
  for row, value in enumerate(values):
    if not isinstance(value, str):
      raise DocumentError(f"{path}, row {row}: column {field!r} holds "
                          f"{type(value).__name__}, not text")
  return [v.encode("utf-8") for v in values]


def _array_record(path: Path, field: str) -> list[bytes]:
  from array_record.python import array_record_module
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
  except Exception as error:   # the reader raises bare runtime errors for malformed files
    raise DocumentError(f"{path} cannot be read as ArrayRecord ({error})") from None
  try:
    records = reader.read_all()
  finally:
    reader.close()
  texts = []
  for index, raw in enumerate(records):
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise DocumentError(f"{path}, record {index}: not a UTF-8 JSON object") from None
    texts.append(_text(record, field, f"{path}, record {index}"))
  return texts


READERS = {".jsonl": _jsonl, ".parquet": _parquet, ".array_record": _array_record,
           ".arrayrecord": _array_record}   # by file suffix


def read_documents(path: Path, field: str) -> list[bytes]:
  """The text of every record of one shard, in order; DocumentError for an unknown format, a
  record without the field or an empty shard."""
  suffix = path.suffix.lower()
  if suffix not in READERS:
    raise DocumentError(f"{path}: data.source='documents' reads {', '.join(READERS)} shards; "
                        f"narrow data.path to those (a glob such as '*.jsonl')")
  texts = READERS[suffix](path, field)
  if not texts:
    raise DocumentError(f"{path} holds no records: remove the empty shard or narrow data.path")
  return texts
