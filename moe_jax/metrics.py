"""Where numbers go: a JSONL file, TensorBoard events and the console; the expert-load plot."""

import json
import os
import sys
from pathlib import Path

import numpy as np


def read_jsonl(path: Path) -> list[dict]:
  """The records of a JSONL file (metrics.jsonl, routing.jsonl); [] if there is none. A line
  cut short (the machine lost power while it was written) is left out."""
  path = Path(path)
  if not path.is_file():
    return []
  records = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return [r for r in records if isinstance(r, dict)]


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch. Where PyTorch is installed,
  tensorboardX imports it only to accept its tensors (this module hands it floats): 1.5 s and
  about 300 MB more for every run's start. Where something imported PyTorch already, as is."""
  if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None   # `import torch` raises ImportError while this entry stands
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard event files, and per-layer routing
  details (expert loads, co-activation, balancing bias) to `routing.jsonl`, in the workdir (process 0)."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      SummaryWriter = _summary_writer_class()
      self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
      self.details = open(Path(workdir) / "routing.jsonl", "a")
      self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write_event(self, step: int, event: str, **fields) -> None:
    """A line in metrics.jsonl that says what the loop did (a rollback, a preemption)."""
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, "event": event, **fields}) + "\n")
      self.jsonl.flush()

  def rewind(self, step: int) -> None:
    """Drops the JSONL records of steps after `step` (they are about to be trained again) and
    any line cut short by a crash, keeping event lines; each file is replaced atomically.
    TensorBoard keeps both versions (its viewer shows the newest per step)."""
    if not self.enabled:
      return
    for attribute in ("jsonl", "details"):
      handle = getattr(self, attribute)
      handle.close()
      path = Path(handle.name)
      kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step or "event" in r]
      temporary = path.with_suffix(".jsonl.tmp")   # rewritten whole: a cut line goes too
      temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(temporary, path)
      setattr(self, attribute, open(path, "a"))

  def write_details(self, step: int, details: dict) -> None:
    if self.enabled:
      self.details.write(json.dumps({"step": step, **details}) + "\n")
      self.details.flush()

  def write(self, step: int, scalars: dict[str, float],
            histograms: dict[str, np.ndarray] | None = None) -> None:
    """Scalars to metrics.jsonl and TensorBoard; histograms (per-expert loads) to TensorBoard
    only, one tag per layer however many experts it has."""
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    for name, values in (histograms or {}).items():
      self.tensorboard.add_histogram(name, np.asarray(values, np.float64), step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.details.close()
      self.tensorboard.close()


def _figure(width: float, height: float, layout: str | None = None):
  """A figure outside pyplot: saving it needs no display and leaves a notebook's backend alone."""
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), layout=layout)


def relative_load(counts_LxE) -> np.ndarray:
  """`routing.relative_load` of each layer, on the host."""
  from moe_jax.routing import relative_load as per_layer   # jax only where loads are read
  return np.asarray(per_layer(np.asarray(counts_LxE)))


def _load_heatmap(ax, counts_LxE, title: str, vmax: float | None = None):
  image = ax.imshow(relative_load(counts_LxE), cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
  ax.set_xlabel("routed expert")
  ax.set_ylabel("MoE layer")
  ax.set_yticks(range(len(counts_LxE)))
  ax.set_title(title, fontsize=9)
  return image


def plot_expert_load(counts_LxE: np.ndarray, path: Path, title: str) -> None:
  """Heatmap of each MoE layer's load per expert, relative to the mean (1.0 = balanced)."""
  rows, cols = np.shape(counts_LxE)
  fig = _figure(max(4, 0.35 * cols + 2), 0.6 * rows + 1.6)
  ax = fig.subplots()
  fig.colorbar(_load_heatmap(ax, counts_LxE, title), ax=ax, label="load / mean load")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def load_grid_figure(counts_by_name: dict[str, list], title: str):
  """Side-by-side load heatmaps (one panel per run) on one colour scale; a notebook shows the
  returned figure with `display(fig)`."""
  names = list(counts_by_name)
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  vmax = max(float(relative_load(c).max()) for c in counts_by_name.values())
  fig = _figure(4.2 * cols + 1, 2.2 * rows + 0.6, layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
  for ax, name in zip(axes.flat, names):
    image = _load_heatmap(ax, counts_by_name[name], name, vmax)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  for ax in axes[:, 1:].flat:
    ax.set_ylabel("")
  for ax in axes[:-1, :].flat:
    ax.set_xlabel("")
  fig.colorbar(image, ax=axes, label="load / mean load", shrink=0.8)
  fig.suptitle(title, fontsize=10)
  return fig


def plot_load_grid(counts_by_name: dict[str, list], path: Path, title: str) -> None:
  load_grid_figure(counts_by_name, title).savefig(path, dpi=110)


def plot_curves(curves: dict[str, list[tuple[int, float]]], ylabel: str, path: Path, title: str,
                log_y: bool = False) -> None:
  """One line per run of (step, value) points."""
  fig = _figure(7, 4.2)
  ax = fig.subplots()
  for name, points in curves.items():
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, label=name, marker="." if len(points) < 12 else None)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if log_y:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


LOAD_QUANTILES = {"min": 0, "p10": 10, "median": 50, "p90": 90, "max": 100}


def load_summary(relative_LxE) -> dict[str, np.ndarray]:
  """Per layer, quantiles of the experts' load relative to the mean (`relative_load`, 1.0 =
  balanced): `load_min`, `load_p10`, `load_median`, `load_p90`, `load_max` (load_max - 1 is the
  window's MaxVio). A fixed number of numbers per layer, however many experts."""
  return {f"load_{name}": np.percentile(relative_LxE, q, axis=-1)
          for name, q in LOAD_QUANTILES.items()}


def summarize_routing(window: list[dict], tokens: int) -> tuple[dict[str, float], dict, dict]:
  """Routing statistics over the steps since the last log (fetched to host in one transfer).

  `window` holds each step's per-layer arrays (steps.routing_metrics); `tokens` is how many
  tokens those steps saw. Returns scalars for metrics.jsonl/TensorBoard (a fixed set per
  layer), for routing.jsonl each layer's load shares and co-activation matrix (shares of
  tokens), and TensorBoard histograms of each layer's relative expert loads.
  """
  from moe_jax import routing
  stacked = {k: np.stack([np.asarray(w[k]) for w in window]) for k in window[0]}
  counts_LxE = stacked["counts"].astype(np.float64).sum(axis=0)
  loads_LxE = counts_LxE / np.maximum(counts_LxE.sum(axis=-1, keepdims=True), 1e-9)
  per_layer = {
      "max_violation": stacked["max_violation"].mean(axis=0),        # mean MaxVio per batch
      "entropy": stacked["entropy"].mean(axis=0),
      "dropped_fraction": stacked["dropped_fraction"].mean(axis=0),
      "confidence": np.asarray(routing.routing_confidence(counts_LxE)),
      "dead_experts": np.asarray(routing.dead_experts(counts_LxE)),
  }
  scalars = {name: float(values.mean()) for name, values in per_layer.items()}
  relative_LxE = relative_load(loads_LxE)
  per_layer.update(load_summary(relative_LxE))
  scalars["dead_experts"] = float(per_layer["dead_experts"].sum())
  for loss in ("switch_loss", "sequence_loss", "z_loss"):
    scalars[loss] = float(stacked[loss].sum(axis=-1).mean())
  for name, values in per_layer.items():
    scalars.update({f"routing/layer{l}/{name}": float(v) for l, v in enumerate(values)})
  histograms = {f"routing/layer{l}/load": relative for l, relative in enumerate(relative_LxE)}
  coactivation = stacked["coactivation"].astype(np.float64).sum(axis=0) / tokens
  details = {"load": loads_LxE.astype(np.float64).round(6).tolist(),
             "coactivation": coactivation.round(6).tolist()}
  return scalars, details, histograms
