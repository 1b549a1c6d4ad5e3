"""FP8 grouped matmuls for Hopper GPUs on Mosaic GPU (e4m3 wgmma), with DeepSeek-V3's scales.

The same products and row layout as fp8_grouped_matmul.py (rows padded per group to 128-row
tiles; 1 x 128 scales for activations and gradients, 128 x 128 blocks for weights, 128 x 1
for the weight gradient's operands), on the tensor cores' FP8 instructions. e4m3 wgmma reads
both operands contraction-last, so every operand is handed over in that layout, and each
kernel is one pattern:

  out tile = sum over steps s of (A_s @ B_s^T) * a_scale_s[:, None] * b_scale_s[None, :]

each step's product accumulated by the tensor cores over one 128-wide scaling tile, then
scaled and added into a float32 accumulator in registers (DeepSeek-V3's promotion to CUDA
cores):

  row_tile_product  out[M, N] = sum_c a[:, c] @ b[g][:, c]^T          steps: contraction chunks
      forward        a = x [M, Kp],  b = w^T [E, Np, Kp]
      data gradient  a = dy [M, Np], b = w [E, Kp, Np]
  group_product     dw[g] = sum over g's row tiles t of xT[:, t] @ dyT[:, t]^T
      weight grad    xT [Kp, M], dyT [Np, M] (quantized 128 x 1 along the rows)

Scales come as one float32 per output row and per output column for each step (a weight
block's scale repeated over its 128 columns): [steps, rows] and [E, steps, columns].

The reference is fp8_grouped_matmul's Pallas kernels and kernels/fp8.py's numerics, which
`python scripts/bench_moe.py --check` compares these with on a GPU (Mosaic GPU does not run on
CPU).

Shape letters: M padded rows, K input width, N output width, E groups, T = M / 128 row tiles,
C contraction chunks of 128; a trailing p marks a width padded to a multiple of 128.
"""

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from moe_jax.kernels import fp8
from moe_jax.kernels.fp8_grouped_matmul import quantize_row_tiles
from moe_jax.manual_axes import gradient_like, typed_like

TILE = fp8.TILE


class FP8Blocks(NamedTuple):
  """Tiles of the Mosaic FP8 kernels: m x n outputs per warpgroup (two float32 accumulators
  of m x n live in registers, so m x n <= 64 x 128), `steps` contraction chunks in flight,
  `ctas_per_sm` kernels' blocks resident per SM (one's scaling overlaps another's wgmma)."""

  m: int = 64
  n: int = 128
  steps: int = 4
  ctas_per_sm: int = 2


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


def _swizzled(dtype, minor: int):
  """TMA transforms of a tile whose minor dimension holds `minor` elements of `dtype`."""
  plgpu = _plgpu()
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _num_sms() -> int:
  """The GPU's SM count (132 on an H100 or H200, the figure used where no GPU is attached)."""
  return getattr(jax.devices()[0], "core_count", 132)


def _load(ref, layout):
  """plgpu.load of the whole ref (jax before 0.11 takes an index, later ones refuse it)."""
  plgpu = _plgpu()
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _scaled_sum(a_gmem, b_gmem, a_scales_gmem, b_scales_gmem, *, steps, a_index, b_index,
                blocks: FP8Blocks):
  """sum over `steps` of (A_s @ B_s^T) * a_scale_s[:, None] * b_scale_s[None, :], float32 in
  registers: A_s the [m, 128] block of a_gmem at a_index(s), B_s the [n, 128] block of b_gmem
  at b_index(s); the scales [1, m] / [1, n] blocks of the scale arrays at the same steps (their
  row the step's scale row, their column the block's)."""
  plgpu = _plgpu()
  from jax.experimental import pallas as pl
  m, n = blocks.m, blocks.n
  operand = _swizzled(fp8.E4M3, TILE)

  def step(_, a_smem, b_smem, a_scale_smem, b_scale_smem, acc):
    def product(acc_ref):
      plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
      return acc_ref[...]

    partial = pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))
    a_scale = _load(a_scale_smem.at[0], plgpu.Layout.WGMMA.reduce(1))   # one per output row
    b_scale = _load(b_scale_smem.at[0], plgpu.Layout.WGMMA.reduce(0))   # one per column
    return acc + (partial * lax.broadcast_in_dim(a_scale, (m, n), [0])
                  * lax.broadcast_in_dim(b_scale, (m, n), [1]))

  first, second = (lambda s: a_index(s)), (lambda s: b_index(s))
  zeros = plgpu.layout_cast(jnp.zeros((m, n), jnp.float32), plgpu.Layout.WGMMA)
  return plgpu.emit_pipeline(
      step, grid=(steps,), max_concurrent_steps=blocks.steps, init_carry=zeros,
      in_specs=[
          plgpu.BlockSpec((m, TILE), lambda s: first(s), transforms=operand),
          plgpu.BlockSpec((n, TILE), lambda s: second(s), transforms=operand),
          plgpu.BlockSpec((1, m), lambda s: (first(s)[1], first(s)[0])),
          plgpu.BlockSpec((1, n), lambda s: (second(s)[1], second(s)[0])),
      ],
  )(a_gmem, b_gmem, a_scales_gmem, b_scales_gmem)


def _store(acc, out_gmem, blocks: FP8Blocks):
  """acc (or zeros for None) into out_gmem, an [m, n] window of the output, through SMEM."""
  plgpu = _plgpu()
  from jax.experimental import pallas as pl

  def scope(out_smem):
    if acc is None:
      out_smem[...] = plgpu.layout_cast(jnp.zeros((blocks.m, blocks.n), out_gmem.dtype),
                                        plgpu.Layout.WGMMA)
    else:
      out_smem[...] = acc.astype(out_gmem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  pl.run_scoped(scope, plgpu.SMEM((blocks.m, blocks.n), out_gmem.dtype,
                                  transforms=_swizzled(out_gmem.dtype, blocks.n)))


def _launch(body, out_shape, out_dtype, blocks: FP8Blocks, *operands):
  plgpu = _plgpu()
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
                      grid=(_num_sms() * blocks.ctas_per_sm,), grid_names=("sm",))(*operands)


def _check_tiles(blocks: FP8Blocks, **widths: int):
  for name, width in widths.items():
    if width % TILE:
      raise ValueError(f"{name}={width} must be a multiple of {TILE} (pad to scaling tiles)")
  if TILE % blocks.m:
    raise ValueError(f"row tile {blocks.m} must divide {TILE}")


def _fitting(n: int, width: int) -> int:
  """The largest of n, n/2, ... down to 64 that divides width (a multiple of 128)."""
  while n > 64 and width % n:
    n //= 2
  return n


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks"))
def row_tile_product(a: Float[Array, "M Cp"], b: Float[Array, "E Np Cp"],
                     a_scales: Float[Array, "C M"], b_scales: Float[Array, "E C Np"],
                     tile_group: Int[Array, "T"], *, out_dtype,
                     blocks: FP8Blocks = FP8Blocks()) -> Float[Array, "M Np"]:
  """out[rows of tile t] = sum_c (a[rows, c] @ b[g, :, c]^T) * scales, g = tile_group[t]
  (e4m3 operands, contraction-last); tiles of no group (tile_group >= E) give zeros."""
  plgpu = _plgpu()
  from jax.experimental import pallas as pl
  rows, contraction = a.shape
  num_groups, width, _ = b.shape
  _check_tiles(blocks, rows=rows, contraction=contraction, width=width)
  blocks = blocks._replace(n=_fitting(blocks.n, width))
  grid = (rows // blocks.m, width // blocks.n)

  def body(tile_group_gmem, a_gmem, b_gmem, a_scales_gmem, b_scales_gmem, out_gmem):
    @plgpu.nd_loop((grid[0] * grid[1],), collective_axes="sm")
    def _(loop_info):
      mi, ni = lax.div(loop_info.index[0], grid[1]), lax.rem(loop_info.index[0], grid[1])
      group = tile_group_gmem[lax.div(mi * blocks.m, TILE)]
      window = out_gmem.at[pl.ds(mi * blocks.m, blocks.m), pl.ds(ni * blocks.n, blocks.n)]

      @pl.when(group < num_groups)
      def _():
        acc = _scaled_sum(a_gmem, b_gmem.at[group], a_scales_gmem, b_scales_gmem.at[group],
                          steps=contraction // TILE, a_index=lambda c: (mi, c),
                          b_index=lambda c: (ni, c), blocks=blocks)
        _store(acc, window, blocks)

      @pl.when(group >= num_groups)
      def _():
        _store(None, window, blocks)

  out = _launch(body, (rows, width), out_dtype, blocks, tile_group, a, b, a_scales, b_scales)
  return typed_like(out, a, b, tile_group)


@functools.partial(jax.jit, static_argnames=("blocks",))
def group_product(x_t: Float[Array, "Kp M"], dy_t: Float[Array, "Np M"],
                  x_scales: Float[Array, "T Kp"], dy_scales: Float[Array, "T Np"],
                  group_tile_start: Int[Array, "E+1"], *,
                  blocks: FP8Blocks = FP8Blocks()) -> Float[Array, "E Kp Np"]:
  """dw[g] = sum over g's row tiles t of (x_t[:, t] @ dy_t[:, t]^T) * x_scales[t][:, None] *
  dy_scales[t][None, :], in float32 (operands e4m3, the rows contracted)."""
  plgpu = _plgpu()
  from jax.experimental import pallas as pl
  k_dim, rows = x_t.shape
  n_dim = dy_t.shape[0]
  num_groups = group_tile_start.shape[0] - 1
  _check_tiles(blocks, rows=rows, k=k_dim, n=n_dim)
  blocks = blocks._replace(n=_fitting(blocks.n, n_dim))
  grid = (num_groups, k_dim // blocks.m, n_dim // blocks.n)

  def body(starts_gmem, x_gmem, dy_gmem, x_scales_gmem, dy_scales_gmem, out_gmem):
    @plgpu.nd_loop((grid[0] * grid[1] * grid[2],), collective_axes="sm")
    def _(loop_info):
      index = loop_info.index[0]
      group = lax.div(index, grid[1] * grid[2])
      ki = lax.div(lax.rem(index, grid[1] * grid[2]), grid[2])
      ni = lax.rem(index, grid[2])
      first, end = starts_gmem[group], starts_gmem[group + 1]
      window = out_gmem.at[group, pl.ds(ki * blocks.m, blocks.m), pl.ds(ni * blocks.n, blocks.n)]

      @pl.when(end > first)
      def _():
        acc = _scaled_sum(x_gmem, dy_gmem, x_scales_gmem, dy_scales_gmem, steps=end - first,
                          a_index=lambda t: (ki, first + t), b_index=lambda t: (ni, first + t),
                          blocks=blocks)
        _store(acc, window, blocks)

      @pl.when(end <= first)
      def _():
        _store(None, window, blocks)

  out = _launch(body, (num_groups, k_dim, n_dim), jnp.float32, blocks, group_tile_start,
                x_t, dy_t, x_scales, dy_scales)
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


def _padded_rows_to(values: Array, rows: int) -> Array:
  return jnp.pad(values, ((0, rows - values.shape[0]), (0, 0)))


def _column_tiles(x: Float[Array, "M K"]) -> tuple[Array, Array]:
  """x quantized in 128 x 1 tiles, held transposed: values [Kp, M] and scales [T, Kp]
  (padding columns zero with scale 1)."""
  columns = fp8.quantize_rows(x.T)                              # [K, M], scales [K, T]
  width = columns.values.shape[0] + (-columns.values.shape[0] % TILE)
  return (_padded_rows_to(columns.values, width),
          jnp.pad(columns.scales.T, ((0, 0), (0, width - x.shape[1])), constant_values=1.0))


def _output_column_scales(block_scales: Float[Array, "E Rb Cb"]) -> Float[Array, "E Cb Rp"]:
  """A weight's 128 x 128 block scales as one scale per output row of the transposed product
  and contraction chunk: block (r, c) repeated over its 128 rows r, chunk-major."""
  return jnp.repeat(jnp.swapaxes(block_scales, 1, 2), TILE, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_gmm(x: Float[Array, "M K"], w: Float[Array, "E K N"], tile_group: Int[Array, "T"],
            group_tile_start: Int[Array, "E+1"], blocks: FP8Blocks = FP8Blocks(),
            kernels: bool = True) -> Float[Array, "M N"]:
  """fp8_grouped_matmul.fp8_gmm (x's 128-row tiles times their group's weight, DeepSeek-V3's
  FP8 numerics, differentiable in x and w) on the Mosaic GPU kernels, or with `kernels=False`
  on their XLA references (the same operands, any backend)."""
  tile_product, _ = _products(kernels)
  weight_t = fp8.quantize_blocks(jnp.swapaxes(w, 1, 2))          # [E, Np, Kp], w^T's blocks
  rows = fp8.quantize_rows(x)                                     # [M, Kp], [M, Kc]
  out = tile_product(rows.values, weight_t.values, rows.scales.T,
                     _output_column_scales(weight_t.scales), tile_group, out_dtype=x.dtype,
                     blocks=blocks)
  return out[:, :w.shape[2]]


def _fp8_gmm_forward(x, w, tile_group, group_tile_start, blocks, kernels):
  return (fp8_gmm(x, w, tile_group, group_tile_start, blocks, kernels),
          (x, w, tile_group, group_tile_start))


def _fp8_gmm_backward(blocks, kernels, residuals, dy):
  tile_product, weight_product = _products(kernels)
  x, w, tile_group, group_tile_start = residuals
  dy = dy.astype(x.dtype)
  weight = fp8.quantize_blocks(w)                                 # [E, Kp, Np]
  dy_rows = fp8.quantize_rows(dy)                                 # [M, Np], [M, Nc]
  dx = tile_product(dy_rows.values, weight.values, dy_rows.scales.T,
                    _output_column_scales(weight.scales), tile_group, out_dtype=x.dtype,
                    blocks=blocks)[:, :x.shape[1]]
  x_t, x_scales = _column_tiles(x)
  dy_t, dy_scales = _column_tiles(dy)
  dw = weight_product(x_t, dy_t, x_scales, dy_scales, group_tile_start, blocks=blocks)
  dw = dw[:, :w.shape[1], :w.shape[2]].astype(w.dtype)
  return gradient_like(dx, x), gradient_like(dw, w), None, None


fp8_gmm.defvjp(_fp8_gmm_forward, _fp8_gmm_backward)


def padded_dot(layout, blocks: FP8Blocks = FP8Blocks(), kernels: bool = True):
  """(x [M, K] in the layout's 128-row-tile order, w [E, K, N]) -> fp8_gmm over the layout."""
  return lambda x, w: fp8_gmm(x, w, layout.tile_group, layout.group_tile_start, blocks, kernels)
