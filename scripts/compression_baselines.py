"""Bits per byte of standard compressors on a config's validation split: the bar a byte-level
language model should clear.

  python scripts/compression_baselines.py                          # configs/default.py's data
  python scripts/compression_baselines.py --config=configs/default.py:tiny

Prints what the corpus holds (for `stdlib`: how much of it is CPython's own test suite) and a
table of gzip -9, bz2 -9 and xz -9e on (a) the whole validation split and (b) exactly the
bytes the config's evaluation scores (its validation windows; with train.eval_batches = 0 all
but the last part-batch; with data.tokenizer='bpe' the windows hold more bytes). BOS markers
between files are left out: compressors see the files' bytes back to back. The whole split's
bytes do not depend on the tokenizer.
"""

import argparse
import bz2
import gzip
import lzma
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax import data   # noqa: E402
from moe_jax.paths import DEFAULT_CONFIG, load_config   # noqa: E402

COMPRESSORS = {
    "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bz2 -9": lambda b: bz2.compress(b, compresslevel=9),
    "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  args = parser.parse_args()
  config = load_config(args.config)
  d = config.data
  corpus = data.configured_corpus(d, config.model.vocab_size)
  if corpus.tokenizer is None:
    parser.exit(2, "compression_baselines.py: error: the config's corpus is token ids, not bytes: "
                "bits per byte do not apply\n")
  m = corpus.manifest
  print(f"corpus: {m['source']} of Python {m['python_version']}, {m['file_count']:,} files, "
        f"{m['bytes'] / 1e6:.2f} MB ({m['train_files']:,} files / "
        f"{m['train_tokens'] / 1e6:.2f} M tokens training, {m['validation_files']:,} files / "
        f"{m['validation_tokens'] / 1e6:.2f} M tokens validation)")
  if d.source == "stdlib":
    root = data.stdlib_root()
    files = data.stdlib_files(root)
    tests = [p for p in files if "test" in p.relative_to(root).parts[:1]
             or "tests" in p.relative_to(root).parts]
    test_bytes = sum(p.stat().st_size for p in tests)
    print(f"  of which CPython's test suite (test/ and tests/ directories): {len(tests):,} "
          f"files, {test_bytes / 1e6:.2f} MB ({100 * test_bytes / m['bytes']:.0f}% of the bytes)")

  windows = data.Windows(corpus.validation, d.seq_len, "validation")
  batches = data.evaluation_batch_count(config.train.eval_batches, len(windows), d.batch_size)
  scored = min(batches * d.batch_size, len(windows))   # windows the evaluation reads (no wrap)
  as_bytes = corpus.tokenizer.decode   # BOS markers stand for no bytes
  parts = {"whole validation split": as_bytes(corpus.validation),
           f"the evaluated windows ({batches} x {d.batch_size} x {d.seq_len} tokens)":
               as_bytes(corpus.validation[:scored * d.seq_len + 1])}
  print(f"\n| compressor | " + " | ".join(f"{name}: bits/byte" for name in parts) + " |")
  print("|---|" + "---|" * len(parts))
  for name, compress in COMPRESSORS.items():
    cells = [f"{8 * len(compress(content)) / len(content):.3f}" for content in parts.values()]
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("\nbytes: " + ", ".join(f"{name} {len(content):,}" for name, content in parts.items()))


if __name__ == "__main__":
  main()
