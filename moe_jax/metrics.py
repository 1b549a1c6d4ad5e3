"""Where numbers go: a JSONL file, TensorBoard events and the console; the expert-load plot."""

import json
from pathlib import Path

import numpy as np


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard event files in the workdir (process 0)."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
      self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


def plot_expert_load(counts_LxE: np.ndarray, path: Path, title: str) -> None:
  """Heatmap of each MoE layer's load per expert, relative to the mean (1.0 = balanced)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = np.asarray(counts_LxE, np.float64)
  relative = counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-9)
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * counts.shape[1] + 2), 0.6 * counts.shape[0] + 1.6))
  image = ax.imshow(relative, cmap="viridis", aspect="auto", vmin=0)
  ax.set_xlabel("routed expert")
  ax.set_ylabel("MoE layer")
  ax.set_yticks(range(counts.shape[0]))
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, label="load / mean load")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
