"""What a training step achieves: model FLOPs per token, TFLOP/s, MFU and device memory.

Model FLOPs count the useful work of one token, as the large trainers report it (PaLM's MFU):
6 x the active weights it is multiplied by (forward 2, backward 4; routed experts count top_k
of E, capacity padding and recomputation do not count) plus causal attention's scores and
weighted values, 3 x S x H x (d_qk + d_v) per attention layer (half of the S x S products).
"""

import jax

from moe_jax.model import ModelSpec, parameter_counts

# Dense bf16 peak TFLOP/s per chip (vendor data sheets), matched against device_kind.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def training_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
  """Model FLOPs of one training token (forward and backward) at context `seq_len`."""
  matmul = parameter_counts(spec)["active_matmul"]
  matmul += spec.mtp_depth * spec.d_model * spec.vocab_size   # each MTP depth reuses the head
  if spec.attention == "mla":
    qk, v = spec.qk_nope_head_dim + spec.qk_rope_head_dim, spec.v_head_dim
  else:
    qk = v = spec.head_dim
  attention_layers = spec.num_layers + spec.mtp_depth
  return 6.0 * matmul + 3.0 * attention_layers * seq_len * spec.num_heads * (qk + v)


def peak_tflops(device_kind: str, configured: float) -> float | None:
  """Peak TFLOP/s of one device: `configured` when > 0, else the table's entry for
  `device_kind` (the longest name it contains), else None (no MFU is reported)."""
  if configured > 0:
    return configured
  known = [name for name in PEAK_TFLOPS if name.lower() in device_kind.lower()]
  return PEAK_TFLOPS[max(known, key=len)] if known else None


def device_memory_gib() -> dict[str, float]:
  """In-use and peak memory of the fullest local device in GiB ({} where the backend does not
  report it, as on CPU)."""
  stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
  if not stats:
    return {}
  gib = 2.0**30
  return {"memory_in_use_gib": max(s.get("bytes_in_use", 0) for s in stats) / gib,
          "memory_peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / gib}


def step_numbers(steps: int, tokens_per_step: int, seconds: float, flops_per_token: float,
                 devices: int, peak: float | None) -> dict[str, float]:
  """tokens/s, seconds per step, TFLOP/s per device and MFU (when the peak is known) of
  `steps` training steps that took `seconds` of step time on `devices` devices."""
  tokens_per_second = steps * tokens_per_step / seconds
  numbers = {"tokens_per_second": tokens_per_second, "step_seconds": seconds / steps,
             "tflops_per_device": tokens_per_second * flops_per_token / devices / 1e12}
  if peak:
    numbers["mfu"] = numbers["tflops_per_device"] / peak
  return numbers
