"""kernels/fp8.py's quantization as Pallas kernels for GPU, in the layouts the Mosaic FP8
kernels read (fp8_mosaic.py): one pass over the input writes the e4m3 values and the scales.

  rows(x [M, K])       1 x 128 tiles (the forward's or data gradient's operand): values
                       [M, K], scales [C, M] (chunk-major)
  columns(x [M, K])    128 x 1 tiles (the weight gradient's operand): values [K, M]
                       (transposed), scales [T, K]
  blocks(w [E, K, N])  128 x 128 blocks: values [E, K, N] and transposed [E, N, K] (the
                       forward's and the data gradient's), scales [E, K/128, N/128]

(One kernel writing both an activation's rows and columns ran slower than the two apart, 2.81
against 1.11 + 1.35 ms at 131,072 x 7,168 on an H200.)

Each tile's scale is its largest magnitude times float32(1 / 448), 1 for an all-zero tile, and
its values are clip(x / scale, -448, 448) rounded to e4m3: kernels/fp8.py's arithmetic, which
the tests compare these with bit for bit in Pallas interpret mode (on CPU). Widths must be
multiples of 128 (the callers pad), and so must M. `QuantizeTiles` sets each kernel's block
and warps (`python scripts/bench_moe.py --tune` times the choices).

Shape letters: M rows, K and N widths, E experts, C = K / 128 chunks, T = M / 128 row tiles.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from moe_jax.kernels import fp8
from moe_jax.manual_axes import kernel_output, typed_like

TILE = fp8.TILE


class QuantizeTiles(NamedTuple):
  """Each kernel's block per program and warps: `rows` takes rows x 128 elements, `columns`
  128 x columns. The defaults timed fastest of four choices at 131,072 x 7,168 on an H200
  (rows 1.07 ms, columns 1.19 ms, a 64 x 7,168 x 2,048 weight 1.94 ms; the others within
  0.05-0.8 ms), which is still about half the memory's speed."""

  rows: int = 128
  rows_warps: int = 4
  columns: int = 64
  columns_warps: int = 4
  blocks_warps: int = 4


TILES = QuantizeTiles()   # what the kernels use unless given others


def _scaled(tiles: Array, amax: Array) -> tuple[Array, Array]:
  """(scale, values clipped to e4m3's range) of float32 tiles whose largest magnitudes are
  amax (broadcasting against tiles)."""
  scale = jnp.where(amax > 0, amax * jnp.float32(1 / fp8.E4M3_MAX), jnp.float32(1))
  return scale, jnp.clip(tiles / scale, -fp8.E4M3_MAX, fp8.E4M3_MAX)


def _scale_and_values(tiles: Array, axis: int) -> tuple[Array, Array]:
  """One scale per slice of float32 tiles along `axis`."""
  return _scaled(tiles, jnp.max(jnp.abs(tiles), axis=axis, keepdims=True))


def _rows_kernel(x_ref, values_ref, scales_ref):
  scale, values = _scale_and_values(x_ref[...].astype(jnp.float32), axis=1)   # [rows, 1]
  values_ref[...] = values.astype(fp8.E4M3)
  scales_ref[...] = scale.T


def _columns_kernel(x_ref, values_ref, scales_ref):
  scale, values = _scale_and_values(x_ref[...].astype(jnp.float32), axis=0)   # [1, width]
  values_ref[...] = values.T.astype(fp8.E4M3)
  scales_ref[...] = scale


def _blocks_kernel(w_ref, values_ref, transposed_ref, scales_ref):
  block = w_ref[0].astype(jnp.float32)                                        # [128, 128]
  amax = jnp.max(jnp.max(jnp.abs(block), axis=1, keepdims=True), axis=0, keepdims=True)
  scale, values = _scaled(block, amax)                                        # [1, 1]
  values_ref[0] = values.astype(fp8.E4M3)
  transposed_ref[0] = values.T.astype(fp8.E4M3)
  scales_ref[...] = scale.reshape(1, 1, 1)


def _quantize(kernel, operand, *, grid, in_block, out_blocks, outputs, num_warps: int, name,
              interpret: bool) -> tuple[Array, ...]:
  """One of the kernels over `operand` (in_block its block), writing `outputs` ((shape,
  dtype) each, out_blocks theirs), typed as the operand inside a shard_map."""
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=2)
  out = pl.pallas_call(
      kernel, grid=grid, in_specs=[in_block], out_specs=out_blocks,
      out_shape=[kernel_output(shape, dtype, operand) for shape, dtype in outputs],
      interpret=interpret, compiler_params=params, name=name,
  )(operand)
  return tuple(typed_like(o, operand) for o in out)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def rows(x: Float[Array, "M K"], interpret: bool = False,
         tiles: QuantizeTiles = TILES) -> tuple[Array, Array]:
  """1 x 128 tiles: e4m3 values [M, K] and float32 scales [C, M]."""
  m, k = x.shape
  fp8.check_whole_tiles(K=k, M=m)
  block = min(tiles.rows, TILE)
  tile = pl.BlockSpec((block, TILE), lambda i, c: (i, c))
  return _quantize(_rows_kernel, x, grid=(m // block, k // TILE), in_block=tile,
                   out_blocks=[tile, pl.BlockSpec((1, block), lambda i, c: (c, i))],
                   outputs=[((m, k), fp8.E4M3), ((k // TILE, m), jnp.float32)],
                   num_warps=tiles.rows_warps, name="fp8_quantize_rows", interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def columns(x: Float[Array, "M K"], interpret: bool = False,
            tiles: QuantizeTiles = TILES) -> tuple[Array, Array]:
  """128 x 1 tiles along the rows, held transposed: e4m3 values [K, M], scales [T, K]."""
  m, k = x.shape
  fp8.check_whole_tiles(M=m, K=k)
  block = min(tiles.columns, TILE)
  return _quantize(_columns_kernel, x, grid=(m // TILE, k // block),
                   in_block=pl.BlockSpec((TILE, block), lambda t, j: (t, j)),
                   out_blocks=[pl.BlockSpec((block, TILE), lambda t, j: (j, t)),
                               pl.BlockSpec((1, block), lambda t, j: (t, j))],
                   outputs=[((k, m), fp8.E4M3), ((m // TILE, k), jnp.float32)],
                   num_warps=tiles.columns_warps, name="fp8_quantize_columns",
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def blocks(w: Float[Array, "E K N"], interpret: bool = False,
           tiles: QuantizeTiles = TILES) -> tuple[Array, Array, Array]:
  """128 x 128 blocks: e4m3 values [E, K, N], the same transposed [E, N, K], scales
  [E, K/128, N/128]."""
  e, k, n = w.shape
  fp8.check_whole_tiles(K=k, N=n)
  block = pl.BlockSpec((1, TILE, TILE), lambda g, i, j: (g, i, j))
  return _quantize(_blocks_kernel, w, grid=(e, k // TILE, n // TILE), in_block=block,
                   out_blocks=[block, pl.BlockSpec((1, TILE, TILE), lambda g, i, j: (g, j, i)),
                               pl.BlockSpec((1, 1, 1), lambda g, i, j: (g, i, j))],
                   outputs=[((e, k, n), fp8.E4M3), ((e, n, k), fp8.E4M3),
                            ((e, k // TILE, n // TILE), jnp.float32)],
                   num_warps=tiles.blocks_warps, name="fp8_quantize_blocks",
                   interpret=interpret)
