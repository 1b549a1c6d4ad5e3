"""FP8 grouped matmuls for GPU: the Pallas (Triton) kernels of grouped_matmul.py with e4m3
operands and DeepSeek-V3's fine-grained scales applied tile by tile.

Rows arrive in grouped_matmul's block-padded layout with 128-row tiles, so every row tile, and
every 128 x 1 scaling tile of the weight gradient, belongs to one expert. Each kernel walks the
contraction in chunks of 128 (one scaling tile) and promotes each chunk's e4m3 product into a
float32 accumulator times the chunk's scales, as DeepSeek-V3 does on CUDA cores:

  fp8_gmm:  out[M, N]   = sum_c (x_c @ w_c) * sx[:, c] * sw[c, n-block]    (forward, and dx)
  fp8_tgmm: dw[E, K, N] = sum over row tiles t of (x_t^T @ dy_t) * sx[t, :]^T * sdy[t, :]

The reference is kernels/fp8.py's `fp8_matmul` over the same row tiles (`tiled_dot`), which the
tests compare these kernels to in Pallas interpret mode on CPU.

Shape letters as in grouped_matmul.py: M padded rows, K input width, N output width, E groups,
G row tiles; a trailing p marks a width padded to a multiple of 128.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from moe_jax.kernels import fp8
from moe_jax.kernels.grouped_matmul import Blocks, GroupLayout, compiler_params
from moe_jax.manual_axes import gradient_like, kernel_output, typed_like

TILE = fp8.TILE
BLOCKS = Blocks(m=TILE, n=TILE, k=TILE, num_warps=8, num_stages=3)   # one scale per block


def _fp8_gmm_kernel(tile_group_ref, x_ref, x_scales_ref, w_ref, w_scales_ref, out_ref, *,
                    chunks: int, num_groups: int, transpose_w: bool):
  tile, column_block = pl.program_id(0), pl.program_id(1)
  group = jnp.minimum(tile_group_ref[tile], num_groups - 1)   # padding tiles hold zero rows
  rows = pl.ds(pl.multiple_of(tile * TILE, TILE), TILE)
  columns = pl.ds(pl.multiple_of(column_block * TILE, TILE), TILE)

  def accumulate(i, acc):
    chunk = pl.ds(pl.multiple_of(i * TILE, TILE), TILE)
    x = x_ref[rows, chunk]
    if transpose_w:    # contract over w's last dimension: each block read transposed, same scale
      w = w_ref[group, columns, chunk].T
      w_scale = w_scales_ref[group, column_block, i]
    else:
      w = w_ref[group, chunk, columns]
      w_scale = w_scales_ref[group, i, column_block]
    x_scale = x_scales_ref[rows, pl.ds(i, 1)]                 # [TILE, 1]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32) * (x_scale * w_scale)

  acc = jax.lax.fori_loop(0, chunks, accumulate, jnp.zeros((TILE, TILE), jnp.float32))
  out_ref[rows, columns] = acc.astype(out_ref.dtype)


def _fp8_tgmm_kernel(group_tile_start_ref, x_ref, x_scales_ref, dy_ref, dy_scales_ref, dw_ref):
  group, k_block, n_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_columns = pl.ds(pl.multiple_of(k_block * TILE, TILE), TILE)
  n_columns = pl.ds(pl.multiple_of(n_block * TILE, TILE), TILE)

  def accumulate(tile, acc):
    rows = pl.ds(pl.multiple_of(tile * TILE, TILE), TILE)
    scales = (x_scales_ref[pl.ds(tile, 1), k_columns].T *     # [TILE, 1] x [1, TILE]
              dy_scales_ref[pl.ds(tile, 1), n_columns])
    return acc + jnp.dot(x_ref[rows, k_columns].T, dy_ref[rows, n_columns],
                         preferred_element_type=jnp.float32) * scales

  first, end = group_tile_start_ref[group], group_tile_start_ref[group + 1]
  acc = jax.lax.fori_loop(first, end, accumulate, jnp.zeros((TILE, TILE), jnp.float32))
  dw_ref[group, k_columns, n_columns] = acc.astype(dw_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_w", "out_dtype", "interpret"))
def fp8_gmm_padded(x: fp8.Quantized, w: fp8.Quantized, tile_group: Int[Array, "G"], *,
                   transpose_w: bool, out_dtype, interpret: bool = False) -> Array:
  """Row tiles of x (1 x 128 scales) times their group's weight (128 x 128 block scales):
  w [E, Kp, Np] (contracted over N with transpose_w). Returns [M, Np] (or [M, Kp])."""
  num_groups, k_dim, n_dim = w.values.shape
  contraction, out_width = (n_dim, k_dim) if transpose_w else (k_dim, n_dim)
  kernel = functools.partial(_fp8_gmm_kernel, chunks=contraction // TILE,
                             num_groups=num_groups, transpose_w=transpose_w)
  rows = x.values.shape[0]
  out = pl.pallas_call(
      kernel, out_shape=kernel_output((rows, out_width), out_dtype, x.values),
      grid=(rows // TILE, out_width // TILE), interpret=interpret,
      compiler_params=compiler_params(BLOCKS, interpret), name="moe_fp8_gmm",
  )(tile_group, x.values, x.scales, w.values, w.scales)
  return typed_like(out, w.values, tile_group)


@functools.partial(jax.jit, static_argnames=("num_groups", "interpret"))
def fp8_tgmm_padded(x: fp8.Quantized, dy: fp8.Quantized, group_tile_start, num_groups: int, *,
                    interpret: bool = False) -> Float[Array, "E Kp Np"]:
  """Per group, the sum over its row tiles of x^T dy, both quantized 128 x 1 (scales [G, .])."""
  k_dim, n_dim = x.values.shape[1], dy.values.shape[1]
  out = pl.pallas_call(
      _fp8_tgmm_kernel,
      out_shape=kernel_output((num_groups, k_dim, n_dim), jnp.float32, x.values),
      grid=(num_groups, k_dim // TILE, n_dim // TILE), interpret=interpret,
      compiler_params=compiler_params(BLOCKS, interpret), name="moe_fp8_tgmm",
  )(group_tile_start, x.values, x.scales, dy.values, dy.scales)
  return typed_like(out, dy.values, group_tile_start)


def quantize_row_tiles(x: Float[Array, "M K"]) -> fp8.Quantized:
  """128 x 1 tiles: one scale per column per 128-row tile (M a multiple of 128), K padded.
  Values [M, Kp], scales [M/128, Kp]."""
  columns = fp8.quantize_rows(x.T)                 # [K, M]: tiles along the rows of x
  values = columns.values.T                        # [M, K]
  width = -x.shape[1] % TILE
  return fp8.Quantized(jnp.pad(values, ((0, 0), (0, width))),
                       jnp.pad(columns.scales.T, ((0, 0), (0, width)), constant_values=1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fp8_gmm(x: Float[Array, "M K"], w: Float[Array, "E K N"], tile_group, group_tile_start,
            interpret: bool) -> Float[Array, "M N"]:
  """x [M, K] (128-row tiles of one group each) times w [E, K, N] per group, in FP8 with
  DeepSeek-V3's scaling, differentiable in x and w (both gradients FP8 kernels too)."""
  out = fp8_gmm_padded(fp8.quantize_rows(x), fp8.quantize_blocks(w), tile_group,
                       transpose_w=False, out_dtype=x.dtype, interpret=interpret)
  return out[:, :w.shape[2]]


def _fp8_gmm_forward(x, w, tile_group, group_tile_start, interpret):
  return fp8_gmm(x, w, tile_group, group_tile_start, interpret), (x, w, tile_group,
                                                                  group_tile_start)


def _fp8_gmm_backward(interpret, residuals, dy):
  x, w, tile_group, group_tile_start = residuals
  weight = fp8.quantize_blocks(w)
  dx = fp8_gmm_padded(fp8.quantize_rows(dy), weight, tile_group, transpose_w=True,
                      out_dtype=x.dtype, interpret=interpret)[:, :x.shape[1]]
  dw = fp8_tgmm_padded(quantize_row_tiles(x), quantize_row_tiles(dy), group_tile_start,
                       w.shape[0], interpret=interpret)
  dw = dw[:, :w.shape[1], :w.shape[2]].astype(w.dtype)
  return gradient_like(dx, x), gradient_like(dw, w), None, None


fp8_gmm.defvjp(_fp8_gmm_forward, _fp8_gmm_backward)


def padded_fp8_dot(layout: GroupLayout, interpret: bool):
  """(x [M, K] in the layout's 128-row-tile order, w [E, K, N]) -> fp8_gmm over the layout."""
  return lambda x, w: fp8_gmm(x, w, layout.tile_group, layout.group_tile_start, interpret)
