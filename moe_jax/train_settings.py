"""The training loop's settings (`train` section): how long, how often it logs, evaluates and
checkpoints, what it samples at the end, and how it treats bad steps. Read by train.py."""

import dataclasses

from moe_jax.settings import Settings


@dataclasses.dataclass(frozen=True)
class TrainSettings(Settings):

  SECTION = "train"

  steps: int = 1000
  microbatches: int = 1            # the global batch in this many slices, one at a time
                                   # (gradient accumulation: one optimizer step per batch)
  log_every: int = 50
  eval_every: int = 500
  eval_batches: int = 0            # validation batches per evaluation; 0: the whole split
  checkpoint_every: int = 500
  checkpoints_to_keep: int = 2
  sample_tokens: int = 200         # length of the text sample printed at the end
  sample_prompt: str = "def "
  peak_tflops: float = 0.0         # one device's peak for MFU; 0: from throughput.py's table
  metrics_port: int = 0            # >0: serve live routing metrics (Prometheus) on this port
  metrics_host: str = "127.0.0.1"
  spike_factor: float = 2.0        # a loss above this x the recent mean rolls back; 0: off
  spike_window: int = 50
  max_rollbacks: int = 3           # rollbacks in a row before giving up
  compilation_cache_dir: str = "~/.cache/moe_jax/xla"   # jax's persistent compilation cache;
                                   # "" off; the JAX_COMPILATION_CACHE_DIR variable wins

  def problems(self) -> list[str]:
    problems = []
    need = lambda ok, message: ok or problems.append(message)
    need(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
    need(self.microbatches >= 1, f"train.microbatches={self.microbatches} must be >= 1")
    for name in ("log_every", "eval_every", "checkpoint_every", "checkpoints_to_keep"):
      need(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
    need(self.eval_batches >= 0, f"train.eval_batches={self.eval_batches} must be >= 0 (0: the "
         f"whole validation split)")
    need(self.sample_tokens >= 0, f"train.sample_tokens={self.sample_tokens} must be >= 0")
    need(0 <= self.metrics_port <= 65535,
         f"train.metrics_port={self.metrics_port} must be 0 (off) or a port")
    need(bool(self.metrics_host.strip()), "train.metrics_host is empty: give an address to "
         "serve the live metrics on (127.0.0.1, or 0.0.0.0 for every interface)")
    need(self.peak_tflops >= 0,
         f"train.peak_tflops={self.peak_tflops} must be >= 0 (0: look the device up)")
    need(self.spike_factor == 0 or self.spike_factor > 1,
         f"train.spike_factor={self.spike_factor} must be 0 (off) or above 1 (a multiple of the "
         f"mean loss)")
    need(self.spike_window >= 1, f"train.spike_window={self.spike_window} must be >= 1")
    need(self.max_rollbacks >= 0, f"train.max_rollbacks={self.max_rollbacks} must be >= 0")
    return problems
