"""What a run logs: a fixed number of routing tags per layer however many experts, model FLOPs
per token worked by hand, the device peak table, and plain log lines."""

import json
import struct

import numpy as np
import pytest

from moe_jax import throughput
from moe_jax.model import ModelSpec
from moe_jax.train import log_line, train_and_evaluate


def _events(directory):
  """Every Event in a TensorBoard directory (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      events.append(event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def test_a_256_expert_model_logs_a_fixed_number_of_tags_per_layer(tiny_config, tmp_path):
  c = tiny_config
  c.model.num_routed_experts, c.model.expert_dim = 256, 8   # one dense and one MoE layer
  c.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=100, sample_tokens=0)
  c.optimizer.warmup_steps = 1
  train_and_evaluate(c, tmp_path)
  events = _events(tmp_path / "tensorboard")
  scalar_tags = {v.tag for e in events for v in e.summary.value if not v.HasField("histo")}
  histograms = [(e.step, v) for e in events for v in e.summary.value if v.HasField("histo")]
  # Per MoE layer: MaxVio, entropy, dropped fraction, confidence, dead experts and five load
  # quantiles (10 tags), against 256 + 5 when every expert had a scalar.
  routing_tags = {t for t in scalar_tags if t.startswith("routing/")}
  assert len(routing_tags) == 10, sorted(routing_tags)
  assert len(scalar_tags) < 60 and not any("expert0" in t for t in scalar_tags)
  # The per-expert loads go to TensorBoard as one histogram per layer and log step...
  assert {v.tag for _, v in histograms} == {"routing/layer0/load"}
  assert len(histograms) == 2 and all(v.histo.num == 256 for _, v in histograms)
  # ...and to routing.jsonl in full; metrics.jsonl holds the same scalar names as TensorBoard.
  details = [json.loads(line) for line in open(tmp_path / "routing.jsonl")]
  assert np.shape(details[-1]["load"]) == (1, 256)
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert set().union(*(r.keys() for r in logged)) - {"step"} == scalar_tags
  last = [r for r in logged if "loss" in r][-1]
  assert last["routing/layer0/load_min"] <= last["routing/layer0/load_median"] <= \
      last["routing/layer0/load_max"]
  # load_max - 1 is the MaxVio of the window's summed counts, from routing.jsonl's loads.
  loads = np.asarray(details[-1]["load"][0])
  assert last["routing/layer0/load_max"] == pytest.approx(loads.max() / loads.mean(), rel=1e-4)


def test_the_metric_writer_starts_without_pytorch(tmp_path):
  """tensorboardX imports PyTorch where it is installed (as in the test extras); the writer
  keeps it out of a run (1.5 s at every start) and its events still read back."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  script = ("import sys; from moe_jax.metrics import MetricWriter; "
            f"w = MetricWriter({str(tmp_path)!r}); w.write(3, {{'loss': 2.5}}); w.close(); "
            "print('torch' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
  (value,) = [(e.step, v.tag, v.simple_value) for e in _events(tmp_path / "tensorboard")
              for v in e.summary.value]
  assert value == (3, "loss", 2.5)


def test_training_flops_per_token_of_the_tiny_model_by_hand(tiny_config):
  # tiny: D=64, 2 blocks (dense, MoE), 2 query heads and 1 kv head of 32, dense MLP 128,
  # 8 routed experts of 32 (top-2) + 1 shared, vocabulary 260, context 64.
  attention = 64 * 2 * 32 + 2 * (64 * 1 * 32) + 2 * 32 * 64            # w_q, w_k + w_v, w_o
  dense = 3 * 64 * 128
  moe = 64 * 8 + 3 * 64 * 32 * 2 + 3 * 64 * 32                         # router, 2 routed, shared
  head = 64 * 260                                                      # the output projection
  matmul = 2 * attention + dense + moe + head
  assert matmul == 84_736
  scores_and_values = 3 * 2 * 64 * 2 * (32 + 32)                       # 2 layers, causal
  expected = 6 * matmul + scores_and_values
  spec = ModelSpec.from_config(tiny_config)
  assert throughput.training_flops_per_token(spec, 64) == expected == 557_568


def test_peak_flops_table_and_override():
  assert throughput.peak_tflops("NVIDIA H100 80GB HBM3", 0.0) == 989.4
  assert throughput.peak_tflops("NVIDIA H100 PCIe", 0.0) == 756.0     # the longer name wins
  assert throughput.peak_tflops("TPU v5 lite", 0.0) == 197.0
  assert throughput.peak_tflops("cpu", 0.0) is None
  assert throughput.peak_tflops("cpu", 1.5) == 1.5
  numbers = throughput.step_numbers(steps=10, tokens_per_step=1000, seconds=2.0,
                                    flops_per_token=1e9, devices=2, peak=10.0)
  assert numbers == pytest.approx({"tokens_per_second": 5000.0, "step_seconds": 0.2,
                                   "tflops_per_device": 2.5, "mfu": 0.25})


def test_a_log_line_holds_the_numbers_a_log_file_needs():
  line = log_line(40, 600, {"loss": 1.23456, "max_violation": 0.5, "tokens_per_second": 12345.6,
                            "step_seconds": 0.0125, "tflops_per_device": 0.42, "mfu": 0.031,
                            "memory_in_use_gib": 1.5, "memory_peak_gib": 2.25,
                            "learning_rate": 0.003})
  assert line == ("step 40/600 | loss 1.2346 | maxvio 0.500 | 12,346 tokens/s | 12.5 ms/step | "
                  "0.42 TFLOP/s/device | MFU 3.1% | memory 1.50 GiB (peak 2.25) | lr 0.003")
