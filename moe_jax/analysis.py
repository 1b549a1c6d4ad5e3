"""Routing analysis for notebooks: load a run, trace each MoE layer's decisions on a batch,
and the statistics the notebooks plot. Everything here is plain functions over arrays, tested
in tests/test_analysis.py; the notebooks only call and plot them.

Shape letters: L MoE layers, B batch, S sequence, E routed experts, K experts per token,
C token categories, N checkpoints.
"""

import dataclasses
import io
import json
import keyword
import tokenize
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import data, routing, steps
from moe_jax import tokenizer as tokenization
from moe_jax.checkpoint import Checkpointer, abstract_like
from moe_jax.config_validation import upgrade_saved_config
from moe_jax.layers.moe import BalancingBias, MoE
from moe_jax.metrics import read_jsonl
from moe_jax.model import ModelSpec
from moe_jax.train import optimizer_from_config, train_and_evaluate

# ---- runs ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A trained run's model at one checkpoint, on one device."""

  workdir: Path
  config: ml_collections.ConfigDict
  step: int
  graphdef: object
  params: nnx.State
  biases: nnx.State

  @property
  def spec(self) -> ModelSpec:
    return ModelSpec.from_config(self.config)


def _read_only_checkpoints(workdir: Path) -> Checkpointer:
  """The run's checkpoints, opened to read: nothing is made or deleted, so the count to keep
  is not used."""
  return Checkpointer(workdir / "checkpoints", keep=1_000_000, read_only=True)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the run's kept checkpoints, oldest first."""
  checkpointer = _read_only_checkpoints(Path(workdir))
  try:
    return checkpointer.kept_steps()
  finally:
    checkpointer.close()


class RunNotFound(ValueError):
  """No run in the directory, or no checkpoint of it at the step asked for; the message says
  which and what there is."""


def load_run(workdir, step: int | None = None) -> Run:
  """The run in `workdir` at checkpoint `step` (default: the newest), on the first device.
  Raises RunNotFound for a directory without a run or a step the run does not keep."""
  workdir = Path(workdir)
  if not (workdir / "config.json").is_file():
    raise RunNotFound(f"{workdir} holds no run (no config.json): name the directory a "
                      f"training run wrote")
  checkpointer = _read_only_checkpoints(workdir)
  try:
    kept = checkpointer.kept_steps()
    if not kept:
      raise RunNotFound(f"the run in {workdir} has no checkpoint yet")
    if step is not None and step not in kept:
      raise RunNotFound(f"the run in {workdir} keeps no checkpoint at step {step}; it keeps "
                        f"steps {', '.join(map(str, kept))}")
    step = kept[-1] if step is None else step
    config = ml_collections.ConfigDict(
        upgrade_saved_config(json.loads((workdir / "config.json").read_text())))
    config.model.remat = "none"                # forward only here
    _, tx = optimizer_from_config(config)   # the optimizer state's layout is in the checkpoint
    abstract = steps.abstract_state(ModelSpec.from_config(config), tx, config.seed)[1]
    # One device here, whatever the run used: no expert parallelism, so no replica plans.
    config.dispatch.update(expert_parallel="none", expert_replicas=0)
    graphdef = steps.abstract_state(ModelSpec.from_config(config), tx, config.seed)[0]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, _ = checkpointer.restore(step, abstract_like(abstract, jax.tree.map(
        lambda _: device, abstract)))
  finally:
    checkpointer.close()
  return Run(workdir, config, step, graphdef, state.params,
             state.biases.filter(BalancingBias))


def run_from_hf(imported) -> Run:
  """A `Run` of a model imported from Hugging Face (`moe_jax.hf.load`), so that the routing
  traces and statistics here work on pretrained models too (no workdir, step 0)."""
  config = ml_collections.ConfigDict(imported.spec.sections())
  return Run(None, config, 0, imported.graphdef, imported.params, imported.biases)


def train_tiny(workdir, arg: str = "tiny", **train_overrides) -> Path:
  """Trains configs/default.py:`arg` in `workdir` unless a finished run is there already."""
  from configs.default import get_config
  workdir = Path(workdir)
  if not (workdir / "final_metrics.json").exists():
    config = get_config(arg)
    config.train.update(train_overrides)
    train_and_evaluate(config, workdir)
  return workdir


def run_corpus(run: Run) -> data.Corpus:
  """The run's corpus, tokenized as the run tokenized it (a BPE from its workdir)."""
  return data.configured_corpus(run.config.data, run.config.model.vocab_size,
                                run.workdir / data.TOKENIZER_FILE)


def validation_batches(run: Run, num_batches: int, batch_size: int | None = None) -> np.ndarray:
  """[num_batches * batch, S + 1] token windows from the start of the run's validation split."""
  d = run.config.data
  corpus = run_corpus(run)
  windows = data.Windows(corpus.validation, d.seq_len, "validation")
  return np.concatenate(list(data.evaluation_batches(windows, num_batches, batch_size or d.batch_size,
                                                     0, 1)))


# ---- routing decisions ---------------------------------------------------------------------


def _trace(graphdef, params, biases, tokens_BxS):
  """The model's own forward, each main-block MoE layer keeping its decision."""
  model = nnx.merge(graphdef, params, biases).with_layout(scan_layers=False)
  layers = [block.mlp for block in model.blocks if isinstance(block.mlp, MoE)]
  for layer in layers:
    if layer.router.expert_choice:
      raise ValueError("routing traces are of token-choice routers; an expert-choice router "
                       "decides per expert")
    layer.keep_decision = True
  model(tokens_BxS)
  return [layer.decision.get_value() for layer in layers]


_trace_jit = jax.jit(_trace, static_argnums=0)


def routing_trace(run: Run, tokens_BxS) -> list[routing.Routing]:
  """Each MoE layer's token-choice decision on `tokens` (inputs, no shifted target): expert_ids
  [B, S, K], gates [B, S, K], probs [B, S, E] and counts [B, E], as numpy arrays."""
  decisions = _trace_jit(run.graphdef, run.params, run.biases, jnp.asarray(tokens_BxS))
  return [routing.Routing(*(np.asarray(a) for a in d)) for d in decisions]


def expert_ids(decisions: list[routing.Routing]) -> np.ndarray:
  """[L, B, S, K] chosen experts of every layer."""
  return np.stack([d.expert_ids for d in decisions])


def expert_load(expert_ids_LxBxSxK: np.ndarray, num_experts: int) -> np.ndarray:
  """[L, E] share of each layer's assignments that each expert received (rows sum to 1)."""
  layers = expert_ids_LxBxSxK.reshape(len(expert_ids_LxBxSxK), -1)
  counts = np.stack([np.bincount(ids, minlength=num_experts) for ids in layers]).astype(np.float64)
  return counts / counts.sum(axis=1, keepdims=True)


def max_violation(load_LxE: np.ndarray) -> np.ndarray:
  """[L] MaxVio of each layer's load: max over experts of load / mean load - 1."""
  return np.asarray(routing.max_violation(jnp.asarray(load_LxE)))


# ---- histories from a run's logs -----------------------------------------------------------


def _log_records(workdir, name: str) -> list[dict]:
  """The records of a run's log file; RunNotFound where the run has none (a mistyped path
  would otherwise plot nothing, silently)."""
  path = Path(workdir) / name
  if not path.is_file():
    raise RunNotFound(f"{Path(workdir)} holds no {name}: name the directory a training run wrote")
  return read_jsonl(path)


def metric_history(workdir, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metrics.jsonl key, e.g. "max_violation" or "validation_loss".
  A key no record has (a typo, or a measure not logged yet) raises ValueError listing the keys
  the run logs."""
  everything = _log_records(workdir, "metrics.jsonl")
  records = [r for r in everything if key in r]
  if not records:
    logged = sorted({k for r in everything for k in r} - {"step"})
    raise ValueError(f"no record of {Path(workdir) / 'metrics.jsonl'} has {key!r} (yet); its "
                     f"records have: {', '.join(logged)}")
  return np.array([r["step"] for r in records]), np.array([r[key] for r in records])


def bias_history(workdir) -> tuple[np.ndarray, np.ndarray]:
  """(steps [T], balancing bias [T, L, E]) as logged in routing.jsonl (none for a run without
  bias updates)."""
  records = [r for r in _log_records(workdir, "routing.jsonl") if "bias" in r]
  return np.array([r["step"] for r in records]), np.array([r["bias"] for r in records])


# ---- what kinds of tokens go where ---------------------------------------------------------

CATEGORIES = ("keyword", "identifier", "whitespace", "string", "comment", "number",
              "punctuation", "other")
_CATEGORY = {name: i for i, name in enumerate(CATEGORIES)}


def _fallback_categories(text: bytes) -> np.ndarray:
  """Character classes, for files Python's tokenizer rejects."""
  out = np.full(len(text), _CATEGORY["other"], np.int8)
  for i, byte in enumerate(text):
    char = chr(byte)
    if char.isspace():
      out[i] = _CATEGORY["whitespace"]
    elif char.isdigit():
      out[i] = _CATEGORY["number"]
    elif char.isalpha() or char == "_" or byte >= 128:
      out[i] = _CATEGORY["identifier"]
    elif char in "#":
      out[i] = _CATEGORY["comment"]
    else:
      out[i] = _CATEGORY["punctuation"]
  return out


def python_byte_categories(source: bytes) -> np.ndarray:
  """The category (index into CATEGORIES) of every byte of a Python source file, from Python's
  own tokenizer: keywords, identifiers, string literals (f-strings included), comments, number
  literals, operators and brackets; bytes outside tokens (indentation, spaces, newlines) are
  whitespace. Files the tokenizer rejects fall back to character classes."""
  categories = np.full(len(source), _CATEGORY["whitespace"], np.int8)
  line_starts = np.concatenate([[0], np.cumsum([len(l) for l in source.splitlines(True)])])
  lines = source.splitlines(True)

  def offset(row: int, col: int) -> int:   # tokenize counts columns in characters
    line = lines[row - 1] if row - 1 < len(lines) else b""
    return int(line_starts[row - 1]) + len(line.decode("utf-8", "replace")[:col].encode())

  try:
    tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
  except (tokenize.TokenError, SyntaxError, UnicodeDecodeError, IndentationError):
    return _fallback_categories(source)
  kinds = {tokenize.STRING: "string", tokenize.COMMENT: "comment", tokenize.NUMBER: "number",
           tokenize.OP: "punctuation"}
  for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):
    if hasattr(tokenize, name):
      kinds[getattr(tokenize, name)] = "string"
  for token in tokens:
    if token.type == tokenize.NAME:
      kind = "keyword" if keyword.iskeyword(token.string) or keyword.issoftkeyword(token.string) \
          else "identifier"
    else:
      kind = kinds.get(token.type)
    if kind is None or token.start[0] < 1:
      continue
    start, end = offset(*token.start), offset(*token.end)
    categories[start:end] = _CATEGORY[kind]
  return categories


def stream_categories(tokens: np.ndarray) -> np.ndarray:
  """Categories aligned with a byte-token stream of Python files, each starting with BOS
  (the stdlib corpus); BOS and other special ids are "other"."""
  tokens = np.asarray(tokens)
  out = np.full(len(tokens), _CATEGORY["other"], np.int8)
  starts = np.flatnonzero(tokens == tokenization.BYTE_BOS_ID)
  bounds = list(starts) + [len(tokens)]
  if len(starts) == 0 or starts[0] != 0:
    bounds = [-1] + bounds     # the stream starts in the middle of a file
  for begin, end in zip(bounds[:-1], bounds[1:]):
    piece = tokens[begin + 1:end]
    if len(piece) and piece.max() < 256:
      out[begin + 1:end] = python_byte_categories(piece.astype(np.uint8).tobytes())
  return out


def categorized_validation(run: Run, num_windows: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, S], categories [N, S]): the first validation windows' inputs and the category
  of each of their bytes (a Python byte corpus, like the default stdlib one)."""
  d = run.config.data
  corpus = run_corpus(run)
  if corpus.tokenizer is None or corpus.tokenizer.kind != "bytes":
    raise ValueError("token categories need a byte corpus of Python files (data.source 'stdlib', "
                     "data.tokenizer 'bytes')")
  categories = stream_categories(corpus.validation)
  windows = data.Windows(corpus.validation, d.seq_len, "validation")
  count = min(num_windows, len(windows))
  starts = np.arange(count) * d.seq_len
  take = lambda a: np.stack([np.asarray(a[i:i + d.seq_len]) for i in starts])
  return take(corpus.validation).astype(np.int32), take(categories)


def category_expert_shares(categories_BxS: np.ndarray, expert_ids_BxSxK: np.ndarray,
                           num_experts: int) -> np.ndarray:
  """[C, E]: of the assignments made for tokens of each category, the share each expert got
  (rows sum to 1; a category with no tokens is all zeros)."""
  num_categories, k = len(CATEGORIES), expert_ids_BxSxK.shape[-1]
  pairs = np.repeat(categories_BxS.reshape(-1), k) * num_experts + expert_ids_BxSxK.reshape(-1)
  counts = np.bincount(pairs, minlength=num_categories * num_experts).reshape(
      num_categories, num_experts).astype(np.float64)
  return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def consecutive_overlap(expert_ids_BxSxK: np.ndarray) -> float:
  """How often a token keeps its predecessor's experts: the mean over adjacent pairs of
  |experts(t) & experts(t-1)| / K (1 = always the same set; about K / E at random)."""
  current, previous = expert_ids_BxSxK[:, 1:, :], expert_ids_BxSxK[:, :-1, :]
  shared = (current[..., :, None] == previous[..., None, :]).any(axis=-1).sum(axis=-1)
  return float(shared.mean() / expert_ids_BxSxK.shape[-1])


def topk_agreement(ids_a_BxSxK: np.ndarray, ids_b_BxSxK: np.ndarray) -> float:
  """The mean share of a token's top-k experts that two routings have in common."""
  shared = (ids_a_BxSxK[..., :, None] == ids_b_BxSxK[..., None, :]).any(axis=-1).sum(axis=-1)
  return float(shared.mean() / ids_a_BxSxK.shape[-1])


# ---- committed sweep results ---------------------------------------------------------------


def sweep_results(results_dir) -> dict:
  """A sweep's results directory as Python values: rows (results.csv), curves and loads."""
  import csv
  results_dir = Path(results_dir)
  rows = list(csv.DictReader(open(results_dir / "results.csv")))
  number = lambda v: float(v) if v not in ("", "None") else None
  for row in rows:
    for key, value in row.items():
      if key not in ("member", "overrides", "status"):
        row[key] = number(value)
  loads_path = results_dir / "expert_loads.json"
  return {"rows": rows,
          "curves": json.loads((results_dir / "curves.json").read_text()),
          "loads": json.loads(loads_path.read_text()) if loads_path.exists() else {}}
