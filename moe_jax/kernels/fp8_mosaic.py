"""FP8 grouped matmuls for Hopper GPUs on Mosaic GPU (e4m3 wgmma), with DeepSeek-V3's scales.

The same products and row layout as fp8_grouped_matmul.py (rows padded per group to 128-row
tiles; 1 x 128 scales for activations and gradients, 128 x 128 blocks for weights, 128 x 1
for the weight gradient's operands), on the tensor cores' FP8 instructions. e4m3 wgmma reads
both operands contraction-last, so every operand is handed over in that layout, and each
kernel is one pattern:

  out tile = sum over steps s of (A_s @ B_s^T) * a_scale_s[:, None] * b_scale_s[None, :]

each step's product accumulated by the tensor cores over one 128-wide scaling tile, then
scaled and added into a float32 accumulator in registers (DeepSeek-V3's promotion to CUDA
cores). As in DeepGEMM, each block of the grid runs two compute warpgroups (64 output rows
each, sharing the B block) and one warpgroup that issues the TMA loads ahead of them, so one
warpgroup's scaling overlaps the other's tensor-core work:

  row_tile_product  out[M, N] = sum_c a[:, c] @ b[g][:, c]^T          steps: contraction chunks
      forward        a = x [M, Kp],  b = w^T [E, Np, Kp]
      data gradient  a = dy [M, Np], b = w [E, Kp, Np]
  group_product     dw[g] = sum over g's row tiles t of xT[:, t] @ dyT[:, t]^T
      weight grad    xT [Kp, M], dyT [Np, M] (quantized 128 x 1 along the rows)

Scales come as one float32 per output row and per output column for each step (a weight
block's scale repeated over its 128 columns): [steps, rows] and [E, steps, columns].

Each kernel's contract is also written in XLA (`row_tile_product_reference`,
`group_product_reference`): `fp8_gmm(..., kernels=False)` runs on them, which the tests
compare with kernels/fp8.py's numerics on CPU; `python scripts/bench_moe.py --check` compares
the kernels with those numerics on a Hopper GPU (Mosaic GPU runs nowhere else).

Shape letters: M padded rows, K input width, N output width, E groups, T = M / 128 row tiles,
C contraction chunks of 128; a trailing p marks a width padded to a multiple of 128.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from moe_jax.kernels import fp8, fp8_quantize, mosaic
from moe_jax.manual_axes import gradient_like, typed_like

TILE = fp8.TILE
WARPGROUP_ROWS = 64   # output rows per compute warpgroup: two of them make one 128-row tile


class FP8Blocks(NamedTuple):
  """Tiles of the Mosaic FP8 kernels: each block of the grid computes a 128 x n output tile,
  64 rows per compute warpgroup (two float32 accumulators of 64 x n live in its registers, so
  n <= 128), with `steps` 128-wide contraction chunks in flight."""

  n: int = 128
  steps: int = 4


class _TileTask(NamedTuple):
  """One output tile's work: whether it has any, its step count, and its windows: operands
  [rows, >= steps * 128] and [n, >= steps * 128], scales [>= steps, rows] and [>= steps, n],
  the output [rows, n]."""

  has_work: Array
  steps: Array | int
  a: object
  b: object
  a_scales: object
  b_scales: object
  out: object


def _warp_specialized(num_tiles: int, task, out_shape, out_dtype, blocks: FP8Blocks,
                      *operands):
  """Runs `task(refs, tile)` -> _TileTask for every output tile, tiles spread over the SMs,
  each CTA two compute warpgroups of 64 rows (sharing the [n, 128] operand block) and
  one warpgroup issuing the TMA loads ahead of them; each compute warpgroup scales every
  step's product into its float32 accumulator while the other one's runs."""
  plgpu = mosaic.plgpu()
  m, n = WARPGROUP_ROWS, blocks.n
  operand = mosaic.swizzled(fp8.E4M3, TILE)
  zeros = lambda: plgpu.layout_cast(jnp.zeros((m, n), jnp.float32), plgpu.Layout.WGMMA)

  def pipeline(step, context, steps):
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(steps,), memory_registers=40, max_concurrent_steps=blocks.steps,
        wg_axis="wg", num_compute_wgs=2, compute_context=context,
        in_specs=[plgpu.BlockSpec((2 * m, TILE), lambda s: (0, s), transforms=operand),
                  plgpu.BlockSpec((n, TILE), lambda s: (0, s), transforms=operand),
                  plgpu.BlockSpec((1, 2 * m), lambda s: (s, 0)),
                  plgpu.BlockSpec((1, n), lambda s: (s, 0))])

  def body(*refs):
    *inputs, out_gmem = refs
    wg = lax.axis_index("wg")
    mine = pl.ds(wg * m, m)                 # this compute warpgroup's rows of the tile
    example = task(inputs, out_gmem, 0)
    ignore = lambda *_, **__: None
    allocations = pipeline(ignore, ignore, 1 << 20).get_allocations(
        example.a, example.b, example.a_scales, example.b_scales)

    def scope(pipeline_allocations, out_smem):
      @plgpu.nd_loop((num_tiles,), collective_axes="sm")
      def _(loop_info):
        work = task(inputs, out_gmem, loop_info.index[0])

        def store(values):
          out_smem[wg] = values.astype(out_dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], work.out.at[mine])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def step(_, a_smem, b_smem, a_scale_smem, b_scale_smem, total):
          def product(acc_ref):
            plgpu.wgmma(acc_ref, a_smem.at[mine], plgpu.transpose_ref(b_smem, (1, 0)))
            return acc_ref[...]

          partial = pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))
          a_scale = mosaic.load(a_scale_smem.at[0, mine], plgpu.Layout.WGMMA.reduce(1))
          b_scale = mosaic.load(b_scale_smem.at[0], plgpu.Layout.WGMMA.reduce(0))
          return total + (partial * lax.broadcast_in_dim(a_scale, (m, n), [0])
                          * lax.broadcast_in_dim(b_scale, (m, n), [1]))

        @pl.when(work.has_work)
        def _():
          pipeline(step, lambda run: store(run(zeros())), work.steps)(
              work.a, work.b, work.a_scales, work.b_scales, allocations=pipeline_allocations)

        @pl.when(jnp.logical_not(work.has_work) & (wg < 2))
        def _():
          store(zeros())

    pl.run_scoped(scope, allocations, plgpu.SMEM((2, m, n), out_dtype,
                                                 transforms=mosaic.swizzled(out_dtype, n)),
                  collective_axes="wg")

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
                      grid=(mosaic.num_sms(),), grid_names=("sm",), num_threads=3,
                      thread_name="wg")(*operands)


def _row_tile_task(num_groups: int, width_blocks: int, n: int):
  rows = TILE

  def task(inputs, out_gmem, tile):
    tile_group_gmem, a_gmem, b_gmem, a_scales_gmem, b_scales_gmem = inputs
    mi, ni = lax.div(tile, width_blocks), lax.rem(tile, width_blocks)
    group = tile_group_gmem[mi]
    safe = jnp.minimum(group, num_groups - 1)
    mine, columns = pl.ds(mi * rows, rows), pl.ds(ni * n, n)
    return _TileTask(group < num_groups, a_gmem.shape[1] // TILE, a_gmem.at[mine],
                     b_gmem.at[safe, columns], a_scales_gmem.at[:, mine],
                     b_scales_gmem.at[safe, :, columns], out_gmem.at[mine, columns])
  return task


def _group_task(k_blocks: int, n_blocks: int, n: int):
  rows = TILE

  def task(inputs, out_gmem, tile):
    starts_gmem, x_gmem, dy_gmem, x_scales_gmem, dy_scales_gmem = inputs
    group = lax.div(tile, k_blocks * n_blocks)
    ki = lax.div(lax.rem(tile, k_blocks * n_blocks), n_blocks)
    ni = lax.rem(tile, n_blocks)
    first, end = starts_gmem[group], starts_gmem[group + 1]
    # Windows from the group's first row tile; they reach past the arrays' ends, where the
    # pipeline never reads (it runs end - first steps).
    tiles, columns = pl.ds(first, x_scales_gmem.shape[0]), pl.ds(first * TILE, x_gmem.shape[1])
    k_rows, n_rows = pl.ds(ki * rows, rows), pl.ds(ni * n, n)
    return _TileTask(end > first, end - first, x_gmem.at[k_rows, columns],
                     dy_gmem.at[n_rows, columns], x_scales_gmem.at[tiles, k_rows],
                     dy_scales_gmem.at[tiles, n_rows], out_gmem.at[group, k_rows, n_rows])
  return task


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks"))
def row_tile_product(a: Float[Array, "M Cp"], b: Float[Array, "E Np Cp"],
                     a_scales: Float[Array, "C M"], b_scales: Float[Array, "E C Np"],
                     tile_group: Int[Array, "T"], *, out_dtype,
                     blocks: FP8Blocks = FP8Blocks()) -> Float[Array, "M Np"]:
  """out[rows of tile t] = sum_c (a[rows, c] @ b[g, :, c]^T) * scales, g = tile_group[t]
  (e4m3 operands, contraction-last); tiles of no group (tile_group >= E) give zeros."""
  rows, contraction = a.shape
  num_groups, width, _ = b.shape
  fp8.check_whole_tiles(rows=rows, contraction=contraction, width=width)
  n = mosaic.tile_width(blocks.n, width)
  out = _warp_specialized(rows // TILE * (width // n), _row_tile_task(num_groups, width // n, n),
                          (rows, width), out_dtype, blocks._replace(n=n), tile_group, a, b,
                          a_scales, b_scales)
  return typed_like(out, a, b, tile_group)


@functools.partial(jax.jit, static_argnames=("blocks",))
def group_product(x_t: Float[Array, "Kp M"], dy_t: Float[Array, "Np M"],
                  x_scales: Float[Array, "T Kp"], dy_scales: Float[Array, "T Np"],
                  group_tile_start: Int[Array, "E+1"], *,
                  blocks: FP8Blocks = FP8Blocks()) -> Float[Array, "E Kp Np"]:
  """dw[g] = sum over g's row tiles t of (x_t[:, t] @ dy_t[:, t]^T) * x_scales[t][:, None] *
  dy_scales[t][None, :], in float32 (operands e4m3, the rows contracted)."""
  k_dim, rows = x_t.shape
  n_dim = dy_t.shape[0]
  num_groups = group_tile_start.shape[0] - 1
  fp8.check_whole_tiles(rows=rows, k=k_dim, n=n_dim)
  n = mosaic.tile_width(blocks.n, n_dim)
  k_blocks, n_blocks = k_dim // TILE, n_dim // n
  out = _warp_specialized(num_groups * k_blocks * n_blocks, _group_task(k_blocks, n_blocks, n),
                          (num_groups, k_dim, n_dim), jnp.float32, blocks._replace(n=n),
                          group_tile_start, x_t, dy_t, x_scales, dy_scales)
  return typed_like(out, x_t, dy_t, group_tile_start)


# ---- the same contracts in XLA: the obviously correct references (any backend) --------------


def row_tile_product_reference(a, b, a_scales, b_scales, tile_group, *, out_dtype,
                               blocks: FP8Blocks = FP8Blocks()):
  """row_tile_product step by step in float32: each chunk's product, scaled, summed."""
  del blocks
  chunks, (num_groups, width, _) = a.shape[1] // TILE, b.shape
  group = jnp.minimum(tile_group, num_groups - 1)
  a_tiles = a.astype(jnp.float32).reshape(-1, TILE, chunks, TILE)             # [T, r, C, k]
  b_tiles = b.astype(jnp.float32)[group].reshape(-1, width, chunks, TILE)     # [T, n, C, k]
  partial = jnp.einsum("trck,tnck->tcrn", a_tiles, b_tiles, precision=lax.Precision.HIGHEST)
  a_scale = jnp.swapaxes(a_scales.reshape(chunks, -1, TILE), 0, 1)           # [T, C, r]
  scaled = partial * a_scale[..., None] * b_scales[group][:, :, None, :]
  out = jnp.where((tile_group < num_groups)[:, None, None], scaled.sum(axis=1), 0)
  return out.reshape(a.shape[0], width).astype(out_dtype)


def group_product_reference(x_t, dy_t, x_scales, dy_scales, group_tile_start, *,
                            blocks: FP8Blocks = FP8Blocks()):
  """group_product tile by tile in float32: each row tile's scaled product summed into its
  group's gradient."""
  del blocks
  tiles = x_t.shape[1] // TILE
  by_tile = lambda v: jnp.swapaxes(v.astype(jnp.float32).reshape(v.shape[0], tiles, TILE), 0, 1)
  partial = jnp.einsum("tkr,tnr->tkn", by_tile(x_t), by_tile(dy_t),
                       precision=lax.Precision.HIGHEST)
  scaled = partial * x_scales[:, :, None] * dy_scales[:, None, :]
  num_groups = group_tile_start.shape[0] - 1
  tile_group = jnp.searchsorted(group_tile_start[1:], jnp.arange(tiles), side="right")
  return jax.ops.segment_sum(scaled, tile_group, num_segments=num_groups)


def _products(kernels: bool):
  return ((row_tile_product, group_product) if kernels
          else (row_tile_product_reference, group_product_reference))


# ---- the three products of y = x @ w, differentiable ---------------------------------------


def quantized_rows(x: Float[Array, "M K"], kernels: bool) -> tuple[Array, Array]:
  """1 x 128 tiles: values [M, Kp], scales [C, M]."""
  x = fp8.padded_to_tiles(x, (1,))
  if kernels:
    return fp8_quantize.rows(x)
  quantized = fp8.quantize_rows(x)
  return quantized.values, quantized.scales.T


def quantized_columns(x: Float[Array, "M K"], kernels: bool) -> tuple[Array, Array]:
  """128 x 1 tiles along the rows, held transposed: values [Kp, M], scales [T, Kp] (padding
  columns zero with scale 1)."""
  x = fp8.padded_to_tiles(x, (1,))
  if kernels:
    return fp8_quantize.columns(x)
  quantized = fp8.quantize_rows(x.T)
  return quantized.values, quantized.scales.T


def quantized_weight(w: Float[Array, "E K N"], kernels: bool) -> tuple[Array, Array, Array]:
  """128 x 128 blocks: values [E, Kp, Np], the same transposed [E, Np, Kp], scales
  [E, K/128, N/128]."""
  if kernels:
    return fp8_quantize.blocks(fp8.padded_to_tiles(w, (1, 2)))
  quantized = fp8.quantize_blocks(w)
  return quantized.values, jnp.swapaxes(quantized.values, 1, 2), quantized.scales


def per_output_column(block_scales: Float[Array, "E C Ob"]) -> Float[Array, "E C Op"]:
  """Block scales [E, contraction chunk, output block] as one scale per output column (each
  block's repeated over its 128 columns), the kernels' b_scales."""
  return jnp.repeat(block_scales, TILE, axis=-1)


def _forward(x, w, tile_group, group_tile_start, blocks, kernels):
  """The product and what the backward pass keeps of it: x, and the weight's blocks in e4m3 in
  the data gradient's layout (quantized once, with the forward's). Of the float32 weight
  only an empty slice, which carries its shape, dtype and type: under FSDP the whole weight
  is a gathered copy the step should not hold until the backward pass (bf16's path keeps a
  2-byte copy, this one a 1-byte one)."""
  tile_product, _ = _products(kernels)
  rows, row_scales = quantized_rows(x, kernels)
  weight, weight_t, weight_scales = quantized_weight(w, kernels)
  out = tile_product(rows, weight_t, row_scales, per_output_column(weight_scales),
                     tile_group, out_dtype=x.dtype, blocks=blocks)[:, :w.shape[2]]
  return out, (x, w[:0], weight, weight_scales, tile_group, group_tile_start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_gmm(x: Float[Array, "M K"], w: Float[Array, "E K N"], tile_group: Int[Array, "T"],
            group_tile_start: Int[Array, "E+1"], blocks: FP8Blocks = FP8Blocks(),
            kernels: bool = True) -> Float[Array, "M N"]:
  """fp8_grouped_matmul.fp8_gmm (x's 128-row tiles times their group's weight, DeepSeek-V3's
  FP8 numerics, differentiable in x and w) on the Mosaic GPU kernels and fp8_quantize's
  passes, or with `kernels=False` on their XLA references (the same operands, any backend)."""
  return _forward(x, w, tile_group, group_tile_start, blocks, kernels)[0]


def _fp8_gmm_backward(blocks, kernels, residuals, dy):
  tile_product, weight_product = _products(kernels)
  x, w_like, weight, weight_scales, tile_group, group_tile_start = residuals
  dy = dy.astype(x.dtype)
  dy_rows, dy_row_scales = quantized_rows(dy, kernels)
  dx = tile_product(dy_rows, weight, dy_row_scales,
                    per_output_column(jnp.swapaxes(weight_scales, 1, 2)), tile_group,
                    out_dtype=x.dtype, blocks=blocks)[:, :x.shape[1]]
  x_columns, x_column_scales = quantized_columns(x, kernels)
  dy_columns, dy_column_scales = quantized_columns(dy, kernels)
  dw = weight_product(x_columns, dy_columns, x_column_scales, dy_column_scales,
                      group_tile_start, blocks=blocks)
  dw = dw[:, :w_like.shape[1], :w_like.shape[2]].astype(w_like.dtype)
  return gradient_like(dx, x), gradient_like(dw, w_like), None, None


fp8_gmm.defvjp(_forward, _fp8_gmm_backward)


def padded_dot(layout, blocks: FP8Blocks = FP8Blocks(), kernels: bool = True):
  """(x [M, K] in the layout's 128-row-tile order, w [E, K, N]) -> fp8_gmm over the layout."""
  return lambda x, w: fp8_gmm(x, w, layout.tile_group, layout.group_tile_start, blocks, kernels)
