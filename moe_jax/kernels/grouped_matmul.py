"""A dropless grouped matmul for GPU: Pallas kernels (Triton backend) over block-padded groups.

Rows sorted by expert arrive in ragged groups. MegaBlocks-style, each group is padded to a
multiple of `block_m` rows, so every row tile of `block_m` rows belongs to one expert and the
kernels run plain dense tiles:

  gmm:   out[M, N]    = x[M, K] @ w[g(tile), K, N]      (forward, and dx with w transposed)
  tgmm:  dw[E, K, N]  = sum over g's tiles of x^T @ dy  (the weight gradient)

in bf16 (or f32) with float32 accumulation. `grouped_matmul(rows, w, group_sizes)` pads, runs
gmm with a custom VJP (both backward products are kernels too) and un-pads; the reference is
`jax.lax.ragged_dot`, which tests compare it to in Pallas interpret mode on CPU.

Shape letters: N rows, M padded rows (a multiple of block_m), K input width, F output width,
E groups (experts), G row tiles.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from moe_jax.kernels import ragged_mosaic
from moe_jax.manual_axes import gradient_like, kernel_output, typed_like


MIN_BLOCK = 16          # the smallest dot Triton takes
MOSAIC_MIN_BLOCK = ragged_mosaic.ROWS   # the Mosaic GPU kernels take widths in multiples of it


class Blocks(NamedTuple):
  """Tile sizes: rows per tile (the group padding), output columns, contraction chunk."""

  m: int = 128
  n: int = 128
  k: int = 64
  num_warps: int = 8
  num_stages: int = 3


class GroupLayout(NamedTuple):
  """Where each row goes when every group is padded to a multiple of block_m rows."""

  tile_group: Int[Array, "G"]          # the group of each row tile (num_groups past the end)
  group_tile_start: Int[Array, "E+1"]  # first tile of each group; the last entry ends them
  padded_source: Int[Array, "M"]       # for each padded row, its row (N for padding)
  padded_row: Int[Array, "N"]          # for each row, its padded row


def padded_rows(num_rows: int, num_groups: int, block_m: int) -> int:
  """A static bound on the padded row count: every group may add block_m - 1 rows."""
  return pl.cdiv(num_rows + num_groups * (block_m - 1), block_m) * block_m


def group_layout(group_sizes: Int[Array, "E"], num_rows: int, block_m: int) -> GroupLayout:
  """The padded layout of `num_rows` rows sorted into groups of `group_sizes` (which may sum
  to less than num_rows: rows past the groups are left out and come back as zeros)."""
  num_groups = group_sizes.shape[0]
  total = padded_rows(num_rows, num_groups, block_m)
  sizes = group_sizes.astype(jnp.int32)
  padded = (sizes + block_m - 1) // block_m * block_m
  starts = jnp.cumsum(sizes) - sizes                     # first row of each group
  padded_starts = jnp.cumsum(padded) - padded            # first padded row of each group
  padded_ends = padded_starts + padded
  # Each row: its group, its rank inside the group, its padded row.
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  # The default binary search (a while loop) here: compare_all, faster alone (0.06 against
  # 0.23 ms at 131,072 rows on an H200), made dropless_fp8 at bench_moe's shape b 16 ms
  # slower (77 -> 93 ms), with or without an optimization barrier after it; not understood.
  group_of_row = jnp.searchsorted(jnp.cumsum(sizes), rows, side="right").astype(jnp.int32)
  in_group = group_of_row < num_groups
  safe_group = jnp.minimum(group_of_row, num_groups - 1)
  padded_row = jnp.where(in_group, padded_starts[safe_group] + rows - starts[safe_group], total)
  padded_source = jnp.full((total + 1,), num_rows, jnp.int32).at[padded_row].set(rows)[:total]
  tile_starts = jnp.arange(total // block_m, dtype=jnp.int32) * block_m
  tile_group = jnp.searchsorted(padded_ends, tile_starts, side="right",   # no while loop
                                method="compare_all").astype(jnp.int32)
  group_tile_start = jnp.concatenate([padded_starts, padded_ends[-1:]]) // block_m
  return GroupLayout(tile_group, group_tile_start.astype(jnp.int32), padded_source,
                     padded_row.astype(jnp.int32))


# ---- kernels -------------------------------------------------------------------------------


def _gmm_kernel(tile_group_ref, x_ref, w_ref, out_ref, *, blocks: Blocks, contraction: int,
                num_groups: int, transpose_w: bool):
  tile, column_block = pl.program_id(0), pl.program_id(1)
  group = jnp.minimum(tile_group_ref[tile], num_groups - 1)   # padding tiles hold zero rows
  rows = pl.ds(pl.multiple_of(tile * blocks.m, blocks.m), blocks.m)
  columns = pl.ds(pl.multiple_of(column_block * blocks.n, blocks.n), blocks.n)

  def accumulate(i, acc):
    chunk = pl.ds(pl.multiple_of(i * blocks.k, blocks.k), blocks.k)
    x = x_ref[rows, chunk]
    if transpose_w:    # w is [E, N, K]: multiply by its transpose without copying it
      w = w_ref[group, columns, chunk].T
    else:
      w = w_ref[group, chunk, columns]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, contraction // blocks.k, accumulate,
                          jnp.zeros((blocks.m, blocks.n), jnp.float32))
  out_ref[rows, columns] = acc.astype(out_ref.dtype)


def _tgmm_kernel(group_tile_start_ref, x_ref, dy_ref, dw_ref, *, blocks: Blocks):
  group, k_block, n_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_columns = pl.ds(pl.multiple_of(k_block * blocks.k, blocks.k), blocks.k)
  n_columns = pl.ds(pl.multiple_of(n_block * blocks.n, blocks.n), blocks.n)

  def accumulate(tile, acc):
    rows = pl.ds(pl.multiple_of(tile * blocks.m, blocks.m), blocks.m)
    return acc + jnp.dot(x_ref[rows, k_columns].T, dy_ref[rows, n_columns],
                         preferred_element_type=jnp.float32)

  first, end = group_tile_start_ref[group], group_tile_start_ref[group + 1]
  acc = jax.lax.fori_loop(first, end, accumulate, jnp.zeros((blocks.k, blocks.n), jnp.float32))
  dw_ref[group, k_columns, n_columns] = acc.astype(dw_ref.dtype)


def compiler_params(blocks: Blocks, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# Each kernel call is a jitted function of its own: jax lowers a jitted function once per
# shapes and static arguments, so a kernel's lowering (slow in Python for the Mosaic ones) runs
# once for all the layers that call it, not once per layer (an unrolled 16-layer step
# compiled in 274 s, mostly these lowerings, and in 37 s with them shared:
# docs/performance.md).
@functools.partial(jax.jit, static_argnames=("blocks", "transpose_w", "interpret"))
def gmm_padded(x: Float[Array, "M K"], w, tile_group: Int[Array, "G"], *, blocks: Blocks,
               transpose_w: bool = False, interpret: bool = False) -> Float[Array, "M F"]:
  """x's row tiles times their group's weight: w [E, K, F] (or [E, F, K] with transpose_w)."""
  num_groups = w.shape[0]
  contraction, out_width = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
  kernel = functools.partial(_gmm_kernel, blocks=blocks, contraction=contraction,
                             num_groups=num_groups, transpose_w=transpose_w)
  out = pl.pallas_call(
      kernel, out_shape=kernel_output((x.shape[0], out_width), x.dtype, x),
      grid=(x.shape[0] // blocks.m, out_width // blocks.n), interpret=interpret,
      compiler_params=compiler_params(blocks, interpret), name="moe_gmm",
  )(tile_group, x, w)
  return typed_like(out, w, tile_group)


@functools.partial(jax.jit, static_argnames=("num_groups", "blocks", "out_dtype", "interpret"))
def tgmm_padded(x: Float[Array, "M K"], dy: Float[Array, "M F"], group_tile_start, num_groups: int,
                *, blocks: Blocks, out_dtype, interpret: bool = False) -> Float[Array, "E K F"]:
  """Per group, the sum over its row tiles of x^T dy: the weight gradient of gmm."""
  width_in, width_out = x.shape[1], dy.shape[1]
  kernel = functools.partial(_tgmm_kernel, blocks=blocks)
  out = pl.pallas_call(
      kernel, out_shape=kernel_output((num_groups, width_in, width_out), out_dtype, x),
      grid=(num_groups, width_in // blocks.k, width_out // blocks.n), interpret=interpret,
      compiler_params=compiler_params(blocks, interpret), name="moe_tgmm",
  )(group_tile_start, x, dy)
  return typed_like(out, dy, group_tile_start)


# ---- differentiable grouped matmul over a padded layout ------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gmm(x, w, tile_group, group_tile_start, blocks: Blocks, interpret: bool):
  """x [M, K] (block-padded groups) times w [E, K, F] per group, differentiable in x and w."""
  return gmm_padded(x, w, tile_group, blocks=blocks, interpret=interpret)


def _gmm_forward(x, w, tile_group, group_tile_start, blocks, interpret):
  return gmm(x, w, tile_group, group_tile_start, blocks, interpret), (x, w, tile_group,
                                                                      group_tile_start)


def _gmm_backward(blocks, interpret, residuals, dy):
  x, w, tile_group, group_tile_start = residuals
  # dx = dy @ w^T: the contraction now runs over F, the output over K.
  dx_blocks = blocks._replace(n=_block(w.shape[1], blocks.n), k=_block(w.shape[2], blocks.k))
  dx = gmm_padded(dy.astype(x.dtype), w, tile_group, blocks=dx_blocks, transpose_w=True,
                  interpret=interpret)
  dw_blocks = blocks._replace(k=_block(w.shape[1], blocks.k), n=_block(w.shape[2], blocks.n))
  dw = tgmm_padded(x, dy.astype(x.dtype), group_tile_start, w.shape[0], blocks=dw_blocks,
                   out_dtype=w.dtype, interpret=interpret)
  return gradient_like(dx, x), gradient_like(dw, w), None, None


gmm.defvjp(_gmm_forward, _gmm_backward)


def _block(dim: int, preferred: int) -> int:
  """The largest power of two <= preferred that divides dim (at least MIN_BLOCK)."""
  block = preferred
  while block > MIN_BLOCK and dim % block:
    block //= 2
  return block


def supported(k_dim: int, f_dim: int) -> bool:
  """Whether the kernels take these widths (multiples of MIN_BLOCK)."""
  return k_dim % MIN_BLOCK == 0 and f_dim % MIN_BLOCK == 0


def fit_blocks(blocks: Blocks, k_dim: int, f_dim: int) -> Blocks:
  return blocks._replace(n=_block(f_dim, blocks.n), k=_block(k_dim, blocks.k))


def pad(rows: Float[Array, "N K"], layout: GroupLayout) -> Float[Array, "M K"]:
  """Rows into the layout's block-padded order (padding rows are zero)."""
  return jnp.concatenate([rows, jnp.zeros_like(rows[:1])])[layout.padded_source]


def unpad(padded: Float[Array, "M F"], layout: GroupLayout) -> Float[Array, "N F"]:
  """Back to the rows' order; rows that were in no group come back as zeros."""
  return jnp.concatenate([padded, jnp.zeros_like(padded[:1])])[layout.padded_row]


def padded_dot(layout: GroupLayout, blocks: Blocks, interpret: bool):
  """(x [M, K], w [E, K, F]) -> gmm over the layout, tiles fitted to w's widths."""
  return lambda x, w: gmm(x, w, layout.tile_group, layout.group_tile_start,
                          fit_blocks(blocks, w.shape[1], w.shape[2]), interpret)


TILE_ROWS = 64   # the "tiles" implementation's row tile (CPU: 32-128 take about the same time)


def batched_matmul(tiles: Float[Array, "G m K"], weights: Float[Array, "G K F"]) -> Float[Array, "G m F"]:
  """Each tile times its own weight, accumulated in float32."""
  return jnp.einsum("gmk,gkf->gmf", tiles, weights, preferred_element_type=jnp.float32)


def tiled_dot(layout: GroupLayout, block_m: int, product=batched_matmul):
  """(x [M, K] in the layout's block-padded order, w [E, K, F]) -> each row tile times its
  group's weight, as one batched XLA matmul over the tiles (`product`, float32 accumulation;
  `fp8.fp8_matmul` for FP8 experts). The result of `jax.lax.ragged_dot` without its CPU
  lowering, which multiplies every row by every group's weight (E times the work: 17x slower
  at 16 groups, 60x at 64, forward and backward). Tiles past the groups hold zero rows, so
  any weight gives them zero."""
  def dot(x: Float[Array, "M K"], w: Float[Array, "E K F"]) -> Float[Array, "M F"]:
    tiles = x.reshape(-1, block_m, x.shape[-1])
    weights = w[jnp.minimum(layout.tile_group, w.shape[0] - 1)]
    return product(tiles, weights).reshape(x.shape[0], w.shape[-1]).astype(x.dtype)
  return dot


def grouped_matmul(rows: Float[Array, "N K"], w: Float[Array, "E K F"], group_sizes: Int[Array, "E"],
                   *, blocks: Blocks = Blocks(), interpret: bool = False) -> Float[Array, "N F"]:
  """`jax.lax.ragged_dot(rows, w, group_sizes)` through the kernels: pad, multiply, un-pad."""
  layout = group_layout(group_sizes, rows.shape[0], blocks.m)
  return unpad(padded_dot(layout, blocks, interpret)(pad(rows, layout), w), layout)


# ---- Hopper: this repository's Mosaic GPU kernels on ragged groups (ragged_mosaic.py) ------


def to_mosaic_rows(rows: Float[Array, "N ..."]) -> Float[Array, "M ..."]:
  """The rows (or one value per row) with zeros appended up to a whole 128-row block, the row
  count the Mosaic kernels take (any row count: e.g. decoding)."""
  count = rows.shape[0]
  extra = -(-count // ragged_mosaic.ROWS) * ragged_mosaic.ROWS - count
  return jnp.pad(rows, ((0, extra),) + ((0, 0),) * (rows.ndim - 1))


def hopper() -> bool:
  """A GPU of compute capability 9.x (H100, H200), where the Mosaic GPU kernels run."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


# ---- which implementation the experts use --------------------------------------------------

# dispatch.grouped_matmul: "mosaic" (ragged_mosaic.py's Mosaic GPU kernels, Hopper), "pallas" (this
# module's Triton kernels, any CUDA GPU), "interpret" (those in Pallas interpret mode, any
# backend), "tiles" (`tiled_dot`: XLA over block-padded row tiles, any backend), "xla"
# (`jax.lax.ragged_dot`) or "auto" (mosaic on Hopper, pallas on other GPUs, tiles on CPU, xla
# elsewhere: TPUs lower ragged_dot natively).
IMPLEMENTATIONS = ("auto", "mosaic", "pallas", "interpret", "tiles", "xla")


def chosen_implementation(k_dim: int, f_dim: int, requested: str = "auto",
                          dtype=jnp.bfloat16) -> str:
  """The implementation the ragged matmuls of experts of these widths and `dtype` use for
  `requested` on this backend: "mosaic", "pallas", "interpret", "tiles" or "xla"."""
  name = requested
  if name == "auto":
    backend = jax.default_backend()
    name = (("mosaic" if hopper() else "pallas") if backend == "gpu"
            else "tiles" if backend == "cpu" else "xla")
  if name == "mosaic" and (k_dim % MOSAIC_MIN_BLOCK or f_dim % MOSAIC_MIN_BLOCK
                           or jnp.dtype(dtype).itemsize != 2):
    name = "pallas"   # its tiles need widths in multiples of 128, its transposed operands
                      # 16-bit values (wgmma)
  if name not in ("xla", "tiles") and not supported(k_dim, f_dim):
    return "xla"
  return name
