"""MoE layer benchmark: forward+backward time of each dispatcher against a dense MLP of the same
FLOPs, timed in the same run, on one accelerator.

  python scripts/bench_moe.py                      # shapes a, b, c; 16K tokens; balanced, skewed
  python scripts/bench_moe.py --shapes=a --tokens=16384,65536 --routing=skewed
  python scripts/bench_moe.py --check              # kernels against jax.lax.ragged_dot first
  python scripts/bench_moe.py --dispatchers=dropless,dropless_fp8   # FP8 experts against bf16
  python scripts/bench_moe.py --tune --shapes=b    # one grouped matmul's tiles, bf16 and FP8
  python scripts/bench_moe.py --torch              # adds the PyTorch reference layer's rows

The layer is the routed part of moe_jax's MoE block (router, dispatch, SwiGLU experts; shared
experts are a dense MLP and are left out) in bfloat16 with float32 parameters, as in training.
Useful TFLOP/s counts only the rows actually computed for routed tokens: 3 matmuls of
2*D*F FLOPs each per (token, expert) assignment, times 3 for forward+backward. The dense
reference runs all T*K rows through one SwiGLU of width F: the same FLOPs in plain matmuls.
With --torch (PyTorch with CUDA on a Hopper GPU) the same layer written in PyTorch runs in the
same process for comparison: sigmoid top-k routing, a sort of the (token, expert) assignments,
three `torch._grouped_mm` calls for the SwiGLU experts and an index_add back to the tokens,
float32 parameters cast to bfloat16, forward and backward, timed the same way (CUDA
synchronised, median after warm-up); it is first checked against a per-token loop.
Skewed routing adds a Zipf-shaped bias (expert of rank r gets -ZIPF*log r) to the router's
choice scores. Each time is the median of --repeats runs after --warmup runs.
"""

import argparse
import concurrent.futures
import datetime
import functools
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments   # noqa: E402
from moe_jax.dispatch import DispatchSettings   # noqa: E402
from moe_jax.kernels import fp8_grouped_matmul as fgm   # noqa: E402
from moe_jax.kernels import fp8_mosaic, fp8_quantize   # noqa: E402
from moe_jax.kernels import grouped_matmul as gm   # noqa: E402
from moe_jax.kernels import ragged_mosaic   # noqa: E402
from moe_jax.layers.mlp import SwiGLU   # noqa: E402
from moe_jax.layers.moe import MoE   # noqa: E402
from moe_jax.routing import RouterSettings   # noqa: E402

SHAPES = {   # name: (D, routed experts E, expert width F, top-k, what it is)
    "a": (2048, 64, 1408, 6, "DeepSeek-V2-Lite layer (its 2 shared experts left out)"),
    "b": (7168, 64, 2048, 8, "DeepSeek-V3-like layer scaled to one GPU (shared left out)"),
    "c": (4096, 8, 14336, 2, "Mixtral-like coarse layer"),
    "t": (1024, 64, 384, 6, "the MoE layer of scripts/bench_train.py's 1.29B model"),
    "tiny": (64, 8, 32, 2, "a smoke test of this script on CPU"),
}
ZIPF = 0.6
DISPATCHERS = {   # name: (dispatcher, grouped matmul implementation, FP8 experts)
    "capacity": ("capacity", "auto", False),
    "dropless": ("dropless", "auto", False),           # mosaic on Hopper, pallas on other GPUs
    "dropless_pallas": ("dropless", "pallas", False),  # this repository's Triton kernels
    "dropless_xla": ("dropless", "xla", False),        # jax.lax.ragged_dot
    "dropless_fp8": ("dropless", "auto", True),        # FP8: Mosaic on Hopper, else Triton
    "dropless_fp8_pallas": ("dropless", "pallas", True),  # the FP8 Triton kernels
}


def median_ms(fn, *args, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def moe_layer(d, e, f, k, dispatcher, skew: bool, seed=0, grouped_matmul="auto", fp8=False,
              **dispatch):
  """The routed layer (`dispatch`: more DispatchSettings fields, e.g. expert parallelism)."""
  layer = MoE(d, e, f, 0, nnx.Rngs(params=seed), router=RouterSettings(top_k=k),
              dispatch=DispatchSettings(strategy=dispatcher, grouped_matmul=grouped_matmul,
                                        fp8_experts=fp8, **dispatch),
              dtype=jnp.bfloat16)
  if skew:
    ranks = np.random.default_rng(seed).permutation(e) + 1
    layer.balancing_bias[...] = jnp.asarray(-ZIPF * np.log(ranks), jnp.float32)
  return layer


def layer_step(layer):
  """jit(forward+backward) of the layer wrt its parameters and input (returning the layer's
  routing statistics too), and the parameters."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) * 1e-6, stats

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  return grad, params


def dense_step(d, f, rows, seed=0):
  mlp = SwiGLU(d, f, jnp.bfloat16, nnx.Rngs(params=seed))
  graphdef, params = nnx.split(mlp, nnx.Param)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2) * 1e-6

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def _random_case(rng, n, k_dim, f_dim, e, weight_dtype, cotangent_dtype):
  """Group sizes skewed (Dirichlet 0.3) over n - 37 rows, one group empty; bf16 rows [n, K],
  weights [e, K, F], a cotangent [n, F]."""
  sizes = rng.multinomial(n - 37, rng.dirichlet(np.full(e, 0.3)))
  sizes[rng.integers(e)] = 0
  rows = jnp.asarray(rng.normal(size=(n, k_dim)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(e, k_dim, f_dim)) / math.sqrt(k_dim), weight_dtype)
  cotangent = jnp.asarray(rng.normal(size=(n, f_dim)), cotangent_dtype)
  return sizes, rows, w, cotangent


def check_kernels(interpret: bool) -> None:
  """The kernels against jax.lax.ragged_dot (float32 reference), fresh random inputs, skewed
  groups with empty ones, forward and both gradients; prints relative errors."""
  rng = np.random.default_rng(int(time.time()))
  print("kernel check (relative error against float32 ragged_dot):")
  cases = [(4096, 256, 512, 16), (20000, 2048, 1408, 64), (3000, 512, 256, 8)]
  if interpret:   # Pallas interpret mode runs the kernels op by op: keep it small
    cases = [(300, 64, 96, 8), (200, 32, 64, 5)]
  for n, k_dim, f_dim, e in cases:
    sizes, rows, w, cotangent = _random_case(rng, n, k_dim, f_dim, e, jnp.bfloat16, jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    blocks = gm.Blocks() if not interpret else gm.Blocks(m=16, n=32, k=32)

    def pallas(rows, w):
      return gm.grouped_matmul(rows, w, group_sizes, blocks=blocks, interpret=interpret)

    def mosaic(rows, w):   # rows padded to whole 128-row blocks, as the experts do
      return ragged_mosaic.grouped_matmul(gm.to_mosaic_rows(rows), w, group_sizes)[:n]

    def reference(rows, w):
      return jax.lax.ragged_dot(rows.astype(jnp.float32), w.astype(jnp.float32), group_sizes)

    def with_grads(fn, rows, w, cotangent):   # arrays as arguments: captured, they would be
      out, vjp = jax.vjp(fn, rows, w)        # constants that XLA spends minutes folding
      return (out, *vjp(cotangent.astype(out.dtype)))

    want = jax.jit(functools.partial(with_grads, reference))(rows, w, cotangent)
    for name, fast in [("pallas", pallas)] + ([("mosaic", mosaic)] if gm.hopper() else []):
      got = jax.jit(functools.partial(with_grads, fast))(rows, w, cotangent)
      errors = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
                for a, b in zip(got, want)]
      finite = all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in got)
      print(f"  {name}: N={n} K={k_dim} F={f_dim} E={e} sizes min/max {sizes.min()}/{sizes.max()}: "
            f"out {errors[0]:.1e}  d_rows {errors[1]:.1e}  d_w {errors[2]:.1e}  finite={finite}")
      assert finite and max(errors) < 2e-2, errors


def check_fp8_kernels(interpret: bool) -> None:
  """The FP8 kernels against kernels/fp8.py's XLA numerics over the same 128-row tiles, and
  both against the float32 product: forward and both gradients, relative errors."""
  from moe_jax.kernels import fp8
  rng = np.random.default_rng(int(time.time()))
  print("FP8 kernel check (relative error against the XLA FP8 numerics; against float32):")
  cases = [(300, 200, 136, 5)] if interpret else [(20000, 2048, 1408, 64), (4096, 7168, 2048, 8)]
  for n, k_dim, f_dim, e in cases:
    sizes, rows, w, cotangent = _random_case(rng, n, k_dim, f_dim, e, jnp.float32, jnp.bfloat16)
    layout = gm.group_layout(jnp.asarray(sizes, jnp.int32), n, fp8.TILE)
    dots = {"xla": gm.tiled_dot(layout, fp8.TILE, fp8.fp8_matmul),
            "float32": gm.tiled_dot(layout, fp8.TILE), "pallas": fgm.padded_fp8_dot(layout, interpret)}
    if gm.hopper():
      dots["mosaic"] = fp8_mosaic.padded_dot(layout)

    def with_grads(dot, rows, w, cotangent):
      fn = lambda r, w: gm.unpad(dot(gm.pad(r, layout), w), layout)
      out, vjp = jax.vjp(fn, rows, w)
      return [a.astype(jnp.float32) for a in (out, *vjp(cotangent.astype(out.dtype)))]

    results = {name: jax.jit(functools.partial(with_grads, dot))(
        rows.astype(jnp.float32) if name == "float32" else rows, w, cotangent)
        for name, dot in dots.items()}
    xla, exact = results.pop("xla"), results.pop("float32")
    error = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    for name, got in results.items():
      print(f"  {name} N={n} K={k_dim} F={f_dim} E={e}: out {error(got[0], xla[0]):.1e} "
            f"({error(got[0], exact[0]):.1e})  d_rows {error(got[1], xla[1]):.1e} "
            f"({error(got[1], exact[1]):.1e})  d_w {error(got[2], xla[2]):.1e} "
            f"({error(got[2], exact[2]):.1e})", flush=True)
      assert max(error(a, b) for a, b in zip(got, xla)) < 1e-2, name


TUNE_BLOCKS = [gm.Blocks(128, 128, 64, 4, 4), gm.Blocks(64, 128, 64, 4, 4),
               gm.Blocks(128, 128, 64, 8, 4), gm.Blocks(128, 256, 64, 8, 2),
               ragged_mosaic.RaggedBlocks(), ragged_mosaic.RaggedBlocks(128, 3, 64, 4),
               ragged_mosaic.RaggedBlocks(64, 4, 64, 4), ragged_mosaic.RaggedBlocks(64, 6, 64, 6),
               # tile order: row-major and no chain (as before), bands without the chain, wider bands
               ragged_mosaic.RaggedBlocks(band=1, chain_steps=0),
               ragged_mosaic.RaggedBlocks(chain_steps=0), ragged_mosaic.RaggedBlocks(band=16)]
TUNE_FP8_BLOCKS = ["fp8 pallas", fp8_mosaic.FP8Blocks(128, 4), fp8_mosaic.FP8Blocks(128, 3),
                   fp8_mosaic.FP8Blocks(64, 4)]   # "fp8 pallas": the Triton FP8 kernels


def tune(shapes, tokens, warmup, repeats) -> None:
  """Forward and forward+backward TFLOP/s of one grouped matmul (rows [T*K, D] times [E, D, F])
  for each tile configuration, against a dense [T*K, D] x [D, F] matmul."""
  for shape in shapes:
    d, e, f, k, _ = SHAPES[shape]
    n = tokens * k
    key = jax.random.key(0)
    rows = jax.random.normal(key, (n, d), jnp.bfloat16)
    w = jax.random.normal(key, (e, d, f), jnp.bfloat16) * 0.02
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(n, np.full(e, 1 / e)), jnp.int32)
    dense_w = w[0]
    flops = 2 * n * d * f
    dense = median_ms(jax.jit(lambda a, b: a @ b), rows, dense_w, warmup=warmup, repeats=repeats)
    dense_grad = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum((a @ b).astype(jnp.float32)),
                                            (0, 1)))
    dense_both = median_ms(dense_grad, rows, dense_w, warmup=warmup, repeats=repeats)
    print(f"tune {shape}: rows {n} x {d} -> {f}, E={e}: dense fwd {flops / dense / 1e9:.0f} "
          f"TFLOP/s, fwd+bwd {3 * flops / dense_both / 1e9:.0f}", flush=True)
    layout = gm.group_layout(sizes, n, 128)    # the FP8 kernels' 128-row tiles
    fp8_dot = lambda r, w, dot: gm.unpad(dot(gm.pad(r, layout), w.astype(jnp.float32)), layout)
    for blocks in TUNE_BLOCKS + TUNE_FP8_BLOCKS:
      if blocks == "fp8 pallas":
        matmul = lambda r, w: fp8_dot(r, w, fgm.padded_fp8_dot(layout, False))
      elif isinstance(blocks, fp8_mosaic.FP8Blocks):
        if not gm.hopper():
          continue
        matmul = lambda r, w, b=blocks: fp8_dot(r, w, fp8_mosaic.padded_dot(layout, b))
      elif isinstance(blocks, ragged_mosaic.RaggedBlocks):
        if not gm.hopper():
          continue
        matmul = lambda r, w, b=blocks: ragged_mosaic.grouped_matmul(r, w, sizes, b)
      else:
        matmul = lambda r, w, b=blocks: gm.grouped_matmul(r, w, sizes, blocks=b)
      fwd = jax.jit(matmul)
      # value_and_grad: the forward result is used, so the forward kernel cannot be dropped
      grad = jax.jit(jax.value_and_grad(lambda r, w, f=matmul: jnp.sum(f(r, w).astype(jnp.float32)),
                                        (0, 1)))
      try:
        t_fwd = median_ms(fwd, rows, w, warmup=warmup, repeats=repeats)
        t_grad = median_ms(grad, rows, w, warmup=warmup, repeats=repeats)
      except Exception as error:
        print(f"  {blocks}: failed: {str(error).splitlines()[0][:160]}", flush=True)
        continue
      name = blocks if isinstance(blocks, str) else f"{type(blocks).__name__}{tuple(blocks)}"
      print(f"  {name}: fwd {t_fwd:.2f} ms {flops / t_fwd / 1e9:.0f} "
            f"TFLOP/s; fwd+bwd {t_grad:.2f} ms {3 * flops / t_grad / 1e9:.0f} TFLOP/s", flush=True)
      if isinstance(blocks, fp8_mosaic.FP8Blocks):
        print("    " + _fp8_kernel_times(gm.pad(rows, layout), w, layout, blocks, flops, warmup,
                                          repeats), flush=True)
      if isinstance(blocks, ragged_mosaic.RaggedBlocks):
        print("    " + _ragged_kernel_times(rows, w, sizes, blocks, flops, warmup, repeats),
              flush=True)


def _ragged_kernel_times(rows, w, sizes, blocks, flops, warmup, repeats) -> str:
  """The three bf16 Mosaic kernels alone (bf16 operands, no casts, the tables made before)."""
  time = lambda fn, *args: median_ms(fn, *args, warmup=warmup, repeats=repeats)
  tiles, steps = ragged_mosaic.row_tiles(sizes, rows.shape[0]), ragged_mosaic.group_steps(sizes)
  dy = jnp.tile(rows, (1, -(-w.shape[2] // w.shape[1])))[:, :w.shape[2]]   # [rows, F]
  kernels = {
      "forward": (functools.partial(ragged_mosaic.row_product, blocks=blocks), (rows, w, tiles)),
      "data gradient": (functools.partial(ragged_mosaic.row_product, transpose_w=True,
                                          blocks=blocks), (dy, w, tiles)),
      "weight gradient (float32)": (functools.partial(ragged_mosaic.weight_product,
                                                      blocks=blocks), (rows, dy, steps))}
  times = {name: time(fn, *args) for name, (fn, args) in kernels.items()}
  return "kernels alone: " + "; ".join(f"{name} {t:.2f} ms {flops / t / 1e9:.0f} TFLOP/s"
                                       for name, t in times.items())


def _fp8_kernel_times(padded_rows, w, layout, blocks, flops, warmup, repeats) -> str:
  """The Mosaic FP8 kernels alone on operands quantized beforehand, and each quantization pass
  as a kernel (fp8_quantize) and in XLA (kernels/fp8.py)."""
  time = lambda fn, *args: median_ms(fn, *args, warmup=warmup, repeats=repeats)
  w = w.astype(jnp.float32)
  rows, row_scales = fp8_mosaic.quantized_rows(padded_rows, True)
  x_t, x_scales = fp8_mosaic.quantized_columns(padded_rows, True)
  _, weight_t, weight_scales = fp8_mosaic.quantized_weight(w, True)
  t_forward = time(functools.partial(fp8_mosaic.row_tile_product, out_dtype=jnp.bfloat16,
                                     blocks=blocks),
                   rows, weight_t, row_scales, fp8_mosaic.per_output_column(weight_scales),
                   layout.tile_group)
  dy_t, dy_scales = fp8_mosaic.quantized_columns(padded_rows[:, :w.shape[2]], True)
  t_weights = time(functools.partial(fp8_mosaic.group_product, blocks=blocks),
                   x_t, dy_t, x_scales, dy_scales, layout.group_tile_start)
  passes = []
  for name, fn, arg in (("rows", fp8_mosaic.quantized_rows, padded_rows),
                        ("columns", fp8_mosaic.quantized_columns, padded_rows),
                        ("weight, both layouts", fp8_mosaic.quantized_weight, w)):
    kernel, xla = (time(jax.jit(functools.partial(fn, kernels=k)), arg) for k in (True, False))
    passes.append(f"{name} {kernel:.2f} (XLA {xla:.2f})")
  return (f"kernels alone: forward {t_forward:.2f} ms {flops / t_forward / 1e9:.0f} TFLOP/s; "
          f"weight gradient {t_weights:.2f} ms {flops / t_weights / 1e9:.0f} TFLOP/s; "
          f"quantizing, ms: " + ", ".join(passes) + "\n" +
          _quantize_tiles_times(padded_rows, w, warmup, repeats))


QUANTIZE_TILES = [fp8_quantize.QuantizeTiles(),   # the defaults, then others
                  fp8_quantize.QuantizeTiles(rows=64, columns=32, blocks_warps=8),
                  fp8_quantize.QuantizeTiles(rows=128, rows_warps=8, columns=128,
                                             columns_warps=8, blocks_warps=16),
                  fp8_quantize.QuantizeTiles(rows=32, columns=128, columns_warps=4)]


def _quantize_tiles_times(x, w, warmup, repeats) -> str:
  """Each quantization kernel's time for each of QUANTIZE_TILES, and the fastest choice."""
  best, lines = {}, []
  for tiles in QUANTIZE_TILES:
    times = {}
    for name, fn, arg in (("rows", fp8_quantize.rows, x), ("columns", fp8_quantize.columns, x),
                          ("blocks", fp8_quantize.blocks, w)):
      times[name] = median_ms(functools.partial(fn, tiles=tiles), arg, warmup=warmup,
                              repeats=repeats)
      if times[name] < best.get(name, (float("inf"),))[0]:
        best[name] = (times[name], tiles)
    lines.append(f"    {tiles}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))
  chosen = fp8_quantize.QuantizeTiles(
      rows=best["rows"][1].rows, rows_warps=best["rows"][1].rows_warps,
      columns=best["columns"][1].columns, columns_warps=best["columns"][1].columns_warps,
      blocks_warps=best["blocks"][1].blocks_warps)
  return "\n".join(lines) + f"\n    fastest: {chosen}"


def _three_products(rows, experts, sizes):
  """The SwiGLU experts with gate and up apart: three grouped matmuls on the Mosaic kernels
  (`experts.ragged` runs gate and up side by side, one product of width 2F)."""
  out = experts.swiglu(gm.to_mosaic_rows(rows),
                       lambda x, w: ragged_mosaic.grouped_matmul(x, w, sizes), casts=True)
  return out[:rows.shape[0]]


def breakdown(shapes, tokens, warmup, repeats) -> None:
  """Where the dropless layer's forward+backward time goes: routing, the permutation round trip
  (sort, gather, un-permute, combine) with identity experts, the experts alone on sorted rows,
  and the whole layer."""
  from moe_jax import routing
  from moe_jax.dispatch import SwiGLUExperts, dropless_dispatch
  for shape in shapes:
    d, e, f, k, _ = SHAPES[shape]
    key = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(key[0], (tokens, d), jnp.bfloat16)
    router = jax.random.normal(key[1], (d, e), jnp.float32) * d ** -0.5
    experts = SwiGLUExperts(*(jax.random.normal(key[i], shp, jnp.bfloat16) * 0.02 for i, shp in
                              [(2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d))]))
    rows = jax.random.normal(key[5], (tokens * k, d), jnp.bfloat16)
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(tokens * k, np.full(e, 1 / e)), jnp.int32)

    def route(x, router):
      logits = x.astype(jnp.float32) @ router
      decision = routing.topk_route(logits, jnp.zeros((e,)), top_k=k, score_function="sigmoid")
      return decision

    class Identity(NamedTuple):
      num_experts: int

      def ragged(self, rows, group_sizes, row_weights=None):
        return rows if row_weights is None else rows * row_weights[:, None]

    parts = {
        "routing (router matmul, scores, top-k)": (
            lambda x, router: jnp.sum(route(x, router).gates ** 2), (x, router)),
        "sort + gather + un-permute + combine": (
            lambda x, router: jnp.sum(dropless_dispatch(
                x, *route(x, router)[:2], Identity(e)).output.astype(jnp.float32) ** 2), (x, router)),
        "experts on sorted rows (gate and up side by side, SwiGLU)": (
            lambda rows, experts: jnp.sum(experts.ragged(rows, sizes).astype(jnp.float32) ** 2),
            (rows, experts)),
        "experts, gate and up apart (three grouped matmuls, mosaic)": (
            lambda rows, experts: jnp.sum(_three_products(rows, experts, sizes)
                                          .astype(jnp.float32) ** 2), (rows, experts)),
        "whole layer": (
            lambda x, experts: jnp.sum(dropless_dispatch(
                x, *route(x, router)[:2], experts).output.astype(jnp.float32) ** 2), (x, experts)),
    }
    if d % ragged_mosaic.ROWS or f % ragged_mosaic.ROWS:   # the Mosaic kernels' tile widths
      del parts["experts, gate and up apart (three grouped matmuls, mosaic)"]
    print(f"breakdown {shape} T={tokens} (fwd+bwd, dropless):", flush=True)
    for name, (fn, args) in parts.items():
      step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
      print(f"  {name}: {median_ms(step, *args, warmup=warmup, repeats=repeats):.2f} ms", flush=True)


class TorchMoE:
  """The routed MoE layer in PyTorch: the reference the JAX dispatchers are compared with."""

  def __init__(self, d, e, f, k, skew: bool, seed=0):
    import torch
    generator = torch.Generator(device="cuda").manual_seed(seed)
    normal = lambda *shape, scale: (torch.randn(*shape, device="cuda", generator=generator)
                                    * scale).requires_grad_()
    self.k, self.e = k, e
    self.router = normal(d, e, scale=d ** -0.5)
    self.w_gate, self.w_up = normal(e, d, f, scale=d ** -0.5), normal(e, d, f, scale=d ** -0.5)
    self.w_down = normal(e, f, d, scale=f ** -0.5)
    ranks = torch.as_tensor(np.random.default_rng(seed).permutation(e) + 1, device="cuda")
    self.bias = -ZIPF * torch.log(ranks.float()) if skew else torch.zeros(e, device="cuda")

  def route(self, x):
    """(expert ids [T, K], gates [T, K]): top-k of sigmoid scores + bias, unbiased gates
    renormalised (DeepSeek-V3)."""
    import torch
    scores = torch.sigmoid(x.float() @ self.router)
    ids = torch.topk(scores + self.bias, self.k, dim=-1).indices
    gates = torch.gather(scores, 1, ids)
    return ids, gates / gates.sum(-1, keepdim=True)

  def forward(self, x):
    import torch
    import torch.nn.functional as F
    ids, gates = self.route(x)
    order = torch.argsort(ids.flatten(), stable=True)
    tokens = order // self.k
    offsets = torch.cumsum(torch.bincount(ids.flatten(), minlength=self.e), 0).to(torch.int32)
    rows = x[tokens]
    cast = lambda w: w.to(torch.bfloat16)
    hidden = (F.silu(torch._grouped_mm(rows, cast(self.w_gate), offs=offsets))
              * torch._grouped_mm(rows, cast(self.w_up), offs=offsets))
    out_rows = torch._grouped_mm(hidden, cast(self.w_down), offs=offsets)
    weighted = out_rows * gates.flatten()[order, None].to(out_rows.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, weighted)

  def reference(self, x):
    """Token by token, expert by expert: the obviously correct layer."""
    import torch
    import torch.nn.functional as F
    ids, gates = self.route(x)
    cast = lambda w: w.to(x.dtype)
    out = []
    for t in range(x.shape[0]):
      total = 0
      for slot in range(self.k):
        e = int(ids[t, slot])
        hidden = F.silu(x[t] @ cast(self.w_gate[e])) * (x[t] @ cast(self.w_up[e]))
        total = total + gates[t, slot].to(x.dtype) * (hidden @ cast(self.w_down[e]))
      out.append(total)
    return torch.stack(out)

  def step(self, x):
    """Forward and backward (parameters and input), as the JAX layer is timed."""
    import torch
    for w in (self.router, self.w_gate, self.w_up, self.w_down, x):
      w.grad = None
    loss = (self.forward(x).float() ** 2).sum() * 1e-6
    loss.backward()
    return loss


def torch_ms(d, e, f, k, tokens, skew, warmup, repeats) -> float:
  import torch
  layer = TorchMoE(d, e, f, k, skew)
  x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
  times = []
  for i in range(warmup + repeats):
    torch.cuda.synchronize()
    start = time.perf_counter()
    layer.step(x)
    torch.cuda.synchronize()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def torch_times(cases, warmup, repeats) -> dict:
  """{(d, e, f, k, tokens, skewed): ms} of the PyTorch layer, after checking it; run in a child
  process, so that PyTorch's memory is the GPU's again before jax takes most of it."""
  import torch
  print(f"PyTorch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
  check_torch_layer()
  times = {}
  for case in cases:
    times[case] = torch_ms(*case, warmup, repeats)
    torch.cuda.empty_cache()
  return times


def check_torch_layer() -> None:
  """The PyTorch layer against its per-token loop on a small input (bfloat16 tolerance)."""
  import torch
  layer = TorchMoE(256, 8, 128, 2, skew=True)
  x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
  with torch.no_grad():
    fast, slow = layer.forward(x).float(), layer.reference(x).float()
  error = float(torch.linalg.norm(fast - slow) / torch.linalg.norm(slow))
  print(f"PyTorch layer against its per-token loop: relative error {error:.1e}", flush=True)
  assert error < 2e-2, error


def run(shapes, token_counts, routings, dispatchers, warmup, repeats, torch_ms_of=None):
  """The table's rows; `torch_ms_of`: the PyTorch layer's times by case (`torch_times`)."""
  rows_out = []
  for shape in shapes:
    d, e, f, k, what = SHAPES[shape]
    for tokens in token_counts:
      x = jax.random.normal(jax.random.key(1), (tokens, 1, d), jnp.bfloat16)   # B=T, S=1
      x = x.reshape(1, tokens, d)   # one sequence: capacity is per sequence, like EP per device
      dense_fn, dense_params = dense_step(d, f, tokens * k)
      dense_x = jax.random.normal(jax.random.key(2), (tokens * k, d), jnp.bfloat16)
      dense_ms = median_ms(dense_fn, dense_params, dense_x, warmup=warmup, repeats=repeats)
      useful = lambda rows: 3 * 3 * 2 * rows * d * f    # fwd+bwd FLOPs of the computed rows
      dense_tflops = useful(tokens * k) / dense_ms / 1e9
      rows_out.append((shape, tokens, "-", "dense MLP (reference)", dense_ms, dense_tflops, 100.0, 0.0, 0.0))
      print(f"{shape} T={tokens}: dense MLP {dense_ms:.2f} ms {dense_tflops:.0f} TFLOP/s", flush=True)
      for routing in routings:
        if torch_ms_of:
          ms = torch_ms_of[(d, e, f, k, tokens, routing == "skewed")]
          tflops = useful(tokens * k) / ms / 1e9
          rows_out.append((shape, tokens, routing, "PyTorch torch._grouped_mm", ms, tflops,
                           100 * tflops / dense_tflops, 0.0, None))
          print(f"  PyTorch torch._grouped_mm {routing}: {ms:.2f} ms {tflops:.0f} TFLOP/s "
                f"({100 * tflops / dense_tflops:.0f}% of dense)", flush=True)
        for name in dispatchers:
          dispatcher, implementation, fp8 = DISPATCHERS[name]
          if name == "dropless_xla" and e > 16:
            rows_out.append((shape, tokens, routing, name, None, None, None, None, None))
            continue   # XLA's ragged_dot is a dense product over all E groups: out of memory
          layer = moe_layer(d, e, f, k, dispatcher, routing == "skewed",
                            grouped_matmul=implementation, fp8=fp8)
          fn, params = layer_step(layer)
          try:
            (_, _), stats = fn(params, x)
            ms = median_ms(fn, params, x, warmup=warmup, repeats=repeats)
          except Exception as error:   # e.g. out of memory: report and go on
            print(f"  {name} {routing}: failed: {str(error).splitlines()[0][:160]}", flush=True)
            rows_out.append((shape, tokens, routing, name, None, None, None, None, None))
            continue
          dropped = float(stats.dropped_fraction)
          counts = np.asarray(stats.counts, np.float64)
          max_violation = float(counts.max() / counts.mean() - 1)
          tflops = useful(tokens * k * (1 - dropped)) / ms / 1e9
          rows_out.append((shape, tokens, routing, name, ms, tflops, 100 * tflops / dense_tflops,
                           dropped, max_violation))
          print(f"  {name} {routing}: {ms:.2f} ms {tflops:.0f} TFLOP/s "
                f"({100 * tflops / dense_tflops:.0f}% of dense), dropped {dropped:.4f}, "
                f"MaxVio {max_violation:.2f}", flush=True)
  return rows_out


def table(rows) -> str:
  fmt = lambda v, f: "-" if v is None else f.format(v)
  lines = ["| shape | tokens | routing | layer | ms | useful TFLOP/s | % of dense | dropped | load MaxVio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for shape, tokens, routing, name, ms, tflops, percent, dropped, vio in rows:
    lines.append(f"| {shape} | {tokens} | {routing} | {name} | {fmt(ms, '{:.2f}')} | "
                 f"{fmt(tflops, '{:.0f}')} | {fmt(percent, '{:.0f}%')} | {fmt(dropped, '{:.4f}')} | "
                 f"{fmt(vio, '{:.2f}')} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", type=arguments.names(*SHAPES), default="a,b,c")
  parser.add_argument("--tokens", type=arguments.whole_numbers(), default="16384")
  parser.add_argument("--routing", type=arguments.names("balanced", "skewed"),
                      default="balanced,skewed")
  parser.add_argument("--dispatchers", type=arguments.names(*DISPATCHERS),
                      default="capacity,dropless,dropless_pallas,dropless_xla")
  parser.add_argument("--warmup", type=arguments.whole_number(0), default=3)
  parser.add_argument("--repeats", type=arguments.whole_number(), default=10)
  parser.add_argument("--check", action="store_true", help="check the kernels first")
  parser.add_argument("--torch", action="store_true",
                      help="add the PyTorch reference layer (sort + torch._grouped_mm)")
  parser.add_argument("--breakdown", action="store_true",
                      help="time the parts of the dropless layer instead")
  parser.add_argument("--tune", action="store_true",
                      help="time the grouped matmul's tile configurations instead")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}", flush=True)
  if args.check:
    check_kernels(interpret=jax.default_backend() != "gpu")
    check_fp8_kernels(interpret=jax.default_backend() != "gpu")
  if args.tune:
    tune(args.shapes, args.tokens[0], args.warmup, args.repeats)
    return
  if args.breakdown:
    breakdown(args.shapes, args.tokens[0], args.warmup, args.repeats)
    return
  shapes, token_counts, routings = args.shapes, args.tokens, args.routing
  torch_ms_of = None
  if args.torch:   # every PyTorch time first, in a process of its own
    cases = [(*SHAPES[shape][:4], tokens, routing == "skewed") for shape in shapes
             for tokens in token_counts for routing in routings]
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")) as pool:
      torch_ms_of = pool.submit(torch_times, cases, args.warmup, args.repeats).result()
  rows = run(shapes, token_counts, routings, args.dispatchers, args.warmup,
             args.repeats, torch_ms_of)
  print()
  print("command: python scripts/bench_moe.py " + " ".join(sys.argv[1:]))
  print(table(rows))


if __name__ == "__main__":
  main()
