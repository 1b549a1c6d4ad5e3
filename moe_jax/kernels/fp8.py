"""FP8 matmuls with DeepSeek-V3's fine-grained scaling, forward and backward.

Every operand is held as e4m3 values times float32 scales, one scale per tile of 128 along the
contraction (DeepSeek-V3, section 3.3): activations and gradients in 1 x 128 tiles (one scale
per row per 128 contracted columns), weights in 128 x 128 blocks. A tile's scale is its largest
magnitude over 448, e4m3's largest finite value, so the largest element maps to 448. Products
accumulate in float32 tile by tile, each partial product scaled by its two tiles' scales.

The three products of a linear layer y = x @ w:

  forward   y  = Q_rows(x)  @ Q_blocks(w)        x tiled along K
  data grad dx = Q_rows(dy) @ Q_blocks(w)^T      dy tiled along N (the same weight blocks)
  weight    dw = Q_rows(x^T) @ Q_rows(dy^T)^T    x and dy tiled along the rows (128 x 1)

all in e4m3 (DeepSeek-V3 uses e4m3 for every tensor, gradients included). Weights arrive in
their master precision (float32) and are quantized at each use; the weight gradient leaves in
that precision.

This module is the numerics, written in XLA: it multiplies the dequantized operands in float32,
which equals the tile-by-tile scaled accumulation up to float32 rounding. It is the reference
the GPU kernels (fp8_grouped_matmul.py) are checked against, and runs on every backend, but it
is not faster than bf16.

Shape letters: M rows, K contraction, N output columns, T tiles along a dimension; leading
batch dimensions (one weight per batch entry, e.g. per expert) are written `...`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0    # e4m3's largest finite value
TILE = 128          # scaling tile along the contraction (and the block's other side)


class Quantized(NamedTuple):
  """e4m3 values (zero-padded to whole tiles) and the float32 scale of each tile."""

  values: Array   # [..., R, C] e4m3, R and C padded as the layout needs
  scales: Array   # [..., R, C/TILE] (row tiles) or [..., R/TILE, C/TILE] (blocks), float32


def padded_to_tiles(x: Array, axes: tuple[int, ...]) -> Array:
  """x zero-padded along `axes` to whole 128-wide tiles (x itself when already whole)."""
  pad = [(0, 0)] * x.ndim
  for axis in axes:
    pad[axis] = (0, -x.shape[axis] % TILE)
  return jnp.pad(x, pad) if any(after for _, after in pad) else x


def check_whole_tiles(**widths: int) -> None:
  """Refuses, by name, a width that is not a multiple of 128 (the kernels' callers pad)."""
  for name, width in widths.items():
    if width % TILE:
      raise ValueError(f"{name}={width} must be a multiple of {TILE} (pad to scaling tiles)")


def _scale(amax: Array) -> Array:
  """amax times float32(1 / 448), and 1 for an all-zero tile (its values are zero whatever the
  scale). A multiplication, because XLA turns a division by a constant into one anyway."""
  return jnp.where(amax > 0, amax * jnp.float32(1 / E4M3_MAX), 1.0).astype(jnp.float32)


def _to_e4m3(scaled: Array) -> Array:
  # Clipped first: x / (amax / 448) can round a hair above 448, and e4m3 has no infinity.
  return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_rows(x: Float[Array, "... M K"]) -> Quantized:
  """1 x 128 tiles along the last dimension: values [..., M, K padded], scales [..., M, T]."""
  x = padded_to_tiles(x.astype(jnp.float32), (-1,))
  tiles = x.reshape(*x.shape[:-1], -1, TILE)
  scales = _scale(jnp.max(jnp.abs(tiles), axis=-1))
  values = _to_e4m3(tiles / scales[..., None])
  return Quantized(values.reshape(x.shape), scales)


def _e4m3_to_float32(values: Array) -> Array:
  # The barrier keeps XLA from folding the float32 -> e4m3 -> float32 round trip into nothing
  # (the GPU compiler removes such convert pairs, which would skip the quantization).
  return jax.lax.optimization_barrier(values).astype(jnp.float32)


def dequantize_rows(q: Quantized) -> Float[Array, "... M K"]:
  tiles = _e4m3_to_float32(q.values).reshape(*q.scales.shape, TILE)
  return (tiles * q.scales[..., None]).reshape(q.values.shape)


def quantize_blocks(w: Float[Array, "... K N"]) -> Quantized:
  """128 x 128 blocks over the last two dimensions: values [..., K, N padded], scales
  [..., K/128, N/128]."""
  w = padded_to_tiles(w.astype(jnp.float32), (-2, -1))
  *batch, rows, columns = w.shape
  blocks = w.reshape(*batch, rows // TILE, TILE, columns // TILE, TILE)
  scales = _scale(jnp.max(jnp.abs(blocks), axis=(-3, -1)))
  values = _to_e4m3(blocks / scales[..., :, None, :, None])
  return Quantized(values.reshape(w.shape), scales)


def dequantize_blocks(q: Quantized) -> Float[Array, "... K N"]:
  *batch, rows, columns = q.values.shape
  blocks = _e4m3_to_float32(q.values).reshape(*batch, rows // TILE, TILE, columns // TILE, TILE)
  return (blocks * q.scales[..., :, None, :, None]).reshape(q.values.shape)


def _rows_of(x: Array) -> Array:
  """x quantized in 1 x 128 tiles along its last dimension, back in float32 (padded)."""
  return dequantize_rows(quantize_rows(x))


def _product(a: Array, b: Array) -> Array:
  return jnp.einsum("...mk,...kn->...mn", a, b, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def fp8_matmul(x: Float[Array, "... M K"], w: Float[Array, "... K N"]) -> Float[Array, "... M N"]:
  """x @ w (batched over leading dimensions) with both operands in e4m3, fine-grained scales
  and float32 accumulation; the result in x's dtype. Differentiable: both gradients are FP8
  products too (see the module's docstring)."""
  return _forward(x, w)


def _forward(x, w):
  rows, columns = x.shape[-2], w.shape[-1]
  out = _product(_rows_of(x), dequantize_blocks(quantize_blocks(w)))
  return out[..., :rows, :columns].astype(x.dtype)


def _fp8_forward(x, w):
  return _forward(x, w), (x, w)


def _fp8_backward(residuals, dy):
  x, w = residuals
  rows, contraction, columns = x.shape[-2], x.shape[-1], w.shape[-1]
  weight = dequantize_blocks(quantize_blocks(w))                    # [..., Kp, Np]
  dy_rows = _rows_of(dy)                                            # [..., M, Np]
  dx = _product(dy_rows, jnp.swapaxes(weight, -1, -2))[..., :rows, :contraction]
  # The weight gradient contracts over the rows: both operands tiled 128 x 1 (along M).
  x_columns = _rows_of(jnp.swapaxes(x, -1, -2))                     # [..., K, Mp]
  dy_columns = _rows_of(jnp.swapaxes(dy, -1, -2))                   # [..., N, Mp]
  dw = _product(x_columns, jnp.swapaxes(dy_columns, -1, -2))[..., :contraction, :columns]
  return dx.astype(x.dtype), dw.astype(w.dtype)


fp8_matmul.defvjp(_fp8_forward, _fp8_backward)
