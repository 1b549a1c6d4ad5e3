"""bf16 grouped matmuls over ragged groups for Hopper GPUs on Mosaic GPU (wgmma), warp-specialized.

The dropless experts' three products on rows sorted by expert, groups left ragged (no padding):

  row_product      out[rows of g] = rows[g] @ w[g]        forward       (w [E, K, N])
                   out[rows of g] = dy[g] @ w[g]^T        data gradient (transpose_w)
  weight_product   dw[g] = rows[g]^T @ dy[g]              weight gradient, written in the
                                                          master weights' dtype (float32),
                                                          split into `parts` arrays by column

Each block of the grid runs two compute warpgroups and one warpgroup that issues the TMA
loads ahead of them; the two compute warpgroups share the block's row operand and each
takes half its columns, accumulating in registers over the whole contraction. A 128-row
block of `row_product` that holds the end of one group and the start of the next is
computed once per group, each storing only its own rows (TMA stores of 64, 32, ... rows);
rows past the groups are written as zeros. `weight_product` walks a group's rows in 64-row
steps from the step holding its first row; rows of the neighbouring groups in its first and
last steps are zeroed in shared memory before the product.

Which tile holds which rows is worked out in XLA (`row_tiles`, `group_steps`), so the
kernels only read tables; `row_product_reference` and `weight_product_reference` run the
same tables in XLA, which the tests compare with `jax.lax.ragged_dot` on CPU.
`python scripts/bench_moe.py --check` compares the kernels themselves on a Hopper GPU.

Shape letters: M rows (a multiple of 128), K contraction width, N output width, E groups,
V row tiles (M / 128 + E).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from moe_jax.kernels import mosaic
from moe_jax.manual_axes import gradient_like, typed_like

ROWS = 128   # rows per block of row_product (both compute warpgroups' operand)
STEP = 64    # contraction step: 64 bf16 values, one 128-byte swizzled row


SHARED_MEMORY = 227 * 1024   # bytes one block may use on Hopper
MAX_STEPS = 4                # steps in flight when shared memory holds more


class RaggedBlocks(NamedTuple):
  """Tiles of the ragged kernels: each compute warpgroup accumulates a 128 x n tile (two per
  block), with `steps` contraction steps in flight (0: as many as shared memory holds beside
  the output tile, at most MAX_STEPS); `weight_*` the same for weight_product.

  row_product walks its tiles in bands of `band` row tiles (a band's column tiles, each for
  the band's row tiles, so that the blocks running at once share a few weight columns in L2)
  and, for contractions of at most `chain_steps` steps, runs one SM's tiles as one chain of
  pipelines: the loads run ahead into the next tile while the last steps and the store of
  this one finish (short contractions refill the pipeline often; at long ones the chain
  measured slower). docs/performance.md has the measurements."""

  n: int = 128
  steps: int = 0
  weight_n: int = 128
  weight_steps: int = 0
  band: int = 8
  chain_steps: int = 16


def _in_flight(requested: int, step_bytes: int, output_bytes: int) -> int:
  """`requested` steps in flight, or for 0 as many as fit in shared memory (at most 4)."""
  return requested or min(MAX_STEPS, (SHARED_MEMORY - output_bytes) // step_bytes)


# ---- which rows each tile holds, in XLA (tiny int32 tables) -------------------------------


def row_tiles(group_sizes: Int[Array, "E"], num_rows: int) -> Int[Array, "4 V"]:
  """For each row tile of row_product: [group (E: rows past the groups, written as zeros),
  128-row block, first row, end row (within the block)]. A block holding rows of several
  groups appears once per group; tiles past the last one have no rows (first = end), so the
  tiles with a group's rows come first (row_product chains them)."""
  num_groups = group_sizes.shape[0]
  total = jnp.sum(group_sizes)
  sizes = jnp.concatenate([group_sizes, (num_rows - total)[None]]).astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first_block, last_block = starts // ROWS, (ends - 1) // ROWS
  count = jnp.where(sizes > 0, last_block - first_block + 1, 0)
  count_end = jnp.cumsum(count)
  tile = jnp.arange(num_rows // ROWS + num_groups, dtype=jnp.int32)
  # compare_all: the default binary search is a while loop, one host round trip per halving
  # on GPU (0.14 against 0.01 ms per layer on an H200).
  group = jnp.minimum(jnp.searchsorted(count_end, tile, side="right", method="compare_all"),
                      num_groups)
  block = first_block[group] + tile - (count_end[group] - count[group])
  used = tile < count_end[-1]
  block = jnp.where(used, block, 0)
  first = jnp.where(used, jnp.clip(starts[group] - block * ROWS, 0, ROWS), 0)
  end = jnp.where(used, jnp.clip(ends[group] - block * ROWS, 0, ROWS), 0)
  return jnp.stack([group, block, first, end]).astype(jnp.int32)


def group_steps(group_sizes: Int[Array, "E"]) -> Int[Array, "4 E"]:
  """For each group of weight_product: [first 64-row step, number of steps, first row, end
  row]."""
  ends = jnp.cumsum(group_sizes).astype(jnp.int32)
  starts = ends - group_sizes.astype(jnp.int32)
  first_step = starts // STEP
  steps = jnp.where(group_sizes > 0, -(-ends // STEP) - first_step, 0)
  return jnp.stack([first_step, steps, starts, ends]).astype(jnp.int32)


# ---- the kernels -----------------------------------------------------------------------------


def _check(rows: int, **widths):
  if rows % ROWS:
    raise ValueError(f"ragged_mosaic needs a multiple of {ROWS} rows, got {rows}")
  for name, width in widths.items():
    if width % ROWS:
      raise ValueError(f"ragged_mosaic needs {name} in multiples of {ROWS}, got {width}")


def _warp_specialized(body, out_type, *operands):
  """One block per SM, two compute warpgroups and one issuing the loads."""
  plgpu = mosaic.plgpu()
  return plgpu.kernel(
      body, out_type=out_type, grid=(mosaic.num_sms(),),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(*operands)


def _pipeline(step, context, steps: int, specs, in_flight: int, state=None):
  plgpu = mosaic.plgpu()
  return plgpu.emit_pipeline_warp_specialized(
      step, grid=(steps,), memory_registers=40, max_concurrent_steps=in_flight,
      wg_axis="wg", num_compute_wgs=2, compute_context=context, in_specs=specs,
      pipeline_state=state)


def _chain_state(local_index, count):
  """A chained pipeline's place in one SM's chain of `count` (> 1): START, STEADY or STOP."""
  states = mosaic.plgpu().PipelinePipeline
  return jnp.where(local_index == 0, int(states.START),
                   jnp.where(local_index == count - 1, int(states.STOP), int(states.STEADY)))


def _accumulate(width: int, store):
  """compute_context: a float32 [128, width] accumulator through the pipeline, then
  `store(values)`."""
  plgpu = mosaic.plgpu()

  def context(run):
    def scope(acc_ref):
      run(acc_ref)
      store(acc_ref[...])
    pl.run_scoped(scope, plgpu.ACC((ROWS, width), jnp.float32))
  return context


def _pipeline_plan(num_steps: int, fit: int, chain_steps: int) -> tuple[int, bool]:
  """(steps in flight, whether one SM's pipelines chain): at most `fit` and the pipeline's
  steps in flight; a chain (for at most `chain_steps` steps) needs them to divide the steps,
  its pipelines handing over buffers in step (none but 1 does: no chain)."""
  in_flight = min(num_steps, fit)
  if num_steps <= chain_steps:
    divisor = max((d for d in range(2, in_flight + 1) if num_steps % d == 0), default=0)
    if divisor:
      return divisor, True
  return in_flight, False


def _band_order(index, band: int, row_tiles, column_blocks: int):
  """Tile `index` of the band order -> (row tile, column block): bands of `band` row tiles,
  each walked column block by column block (the last band may hold fewer row tiles)."""
  band_tiles = band * column_blocks
  first_row_tile = lax.div(index, band_tiles) * band
  within = lax.rem(index, band_tiles)
  rows_in_band = jnp.minimum(band, row_tiles - first_row_tile)
  return first_row_tile + lax.rem(within, rows_in_band), lax.div(within, rows_in_band)


@functools.partial(jax.jit, static_argnames=("transpose_w", "blocks"))
def row_product(rows: Float[Array, "M K"], w: Float[Array, "E K N"], tiles: Int[Array, "4 V"],
                *, transpose_w: bool = False,
                blocks: RaggedBlocks = RaggedBlocks()) -> Float[Array, "M N"]:
  """out[r] = rows[r] @ w[g] (w[g]^T with transpose_w: w [E, N, K]) for the rows r of each
  group g in `tiles` (row_tiles), zeros for rows past the groups."""
  plgpu = mosaic.plgpu()
  num_rows, contraction = rows.shape
  num_groups = w.shape[0]
  width = w.shape[1] if transpose_w else w.shape[2]
  _check(num_rows, contraction=contraction, width=width)
  n = mosaic.tile_width(blocks.n, width, per_block=2)
  column_blocks = width // (2 * n)
  num_steps = contraction // STEP
  itemsize = jnp.dtype(rows.dtype).itemsize
  fit = _in_flight(blocks.steps, (ROWS + 2 * n) * STEP * itemsize, 2 * ROWS * n * itemsize)
  in_flight, chain = _pipeline_plan(num_steps, fit, blocks.chain_steps)
  num_row_tiles = tiles.shape[1]
  operand = mosaic.swizzled(rows.dtype, STEP)
  b_spec = (plgpu.BlockSpec((2 * n, STEP), lambda s: (0, s), transforms=operand)
            if transpose_w else
            plgpu.BlockSpec((STEP, 2 * n), lambda s: (s, 0), transforms=operand))
  specs = [plgpu.BlockSpec((ROWS, STEP), lambda s: (0, s), transforms=operand), b_spec]

  def body(tiles_gmem, computed_gmem, rows_gmem, w_gmem, out_gmem):
    wg = lax.axis_index("wg")
    mine = pl.ds(wg * n, n)
    ignore = lambda *_, **__: None
    w_block = (w_gmem.at[0, pl.ds(0, 2 * n)] if transpose_w
               else w_gmem.at[0, :, pl.ds(0, 2 * n)])
    allocations = _pipeline(ignore, ignore, num_steps, specs, in_flight).get_allocations(
        rows_gmem.at[pl.ds(0, ROWS)], w_block)
    # Row tiles holding a group's rows: a prefix of the table, then tiles of rows past the
    # groups (written as zeros) and tiles with no rows.
    computed = computed_gmem[0]

    def read_tile(ti):
      return [tiles_gmem[i * num_row_tiles + ti] for i in range(4)]

    def scope(pipeline_allocations, out_smem):
      def store(block, first, end, ci, values):
        """This warpgroup's columns of rows first..end of the block (TMA stores of a power
        of two rows each: a store's row count is static)."""
        columns = pl.ds(ci * 2 * n + wg * n, n)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg] = values.astype(out_gmem.dtype)
        plgpu.commit_smem()
        start, count, size = first, end - first, ROWS
        while size:
          @pl.when(count & size != 0)
          def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(out_smem.at[wg, pl.ds(start, size)],
                                    out_gmem.at[pl.ds(block * ROWS + start, size), columns])
          start += count & size
          size //= 2

      def step(_, a_smem, b_smem, acc_ref):
        b = (plgpu.transpose_ref(b_smem.at[mine], (1, 0)) if transpose_w
             else b_smem.at[:, mine])
        plgpu.wgmma(acc_ref, a_smem, b)
        plgpu.wgmma_wait(0)   # the slot is released when the step returns
        return acc_ref

      @plgpu.nd_loop((computed * column_blocks,), collective_axes="sm")
      def _(loop_info):
        ti, ci = _band_order(loop_info.index[0], blocks.band, computed, column_blocks)
        group, block, first, end = read_tile(ti)
        block_columns = pl.ds(ci * 2 * n, 2 * n)
        b_window = (w_gmem.at[group, block_columns] if transpose_w
                    else w_gmem.at[group, :, block_columns])
        context = _accumulate(n, functools.partial(store, block, first, end, ci))
        operands = (rows_gmem.at[pl.ds(block * ROWS, ROWS)], b_window)
        def run(state=None):
          _pipeline(step, context, num_steps, specs, in_flight, state)(
              *operands, allocations=pipeline_allocations)

        if not chain:
          run()
        else:   # an SM with one tile runs a pipeline alone (a chain's state is not both ends)
          count = loop_info.num_local_steps
          pl.when(count == 1)(run)
          pl.when(count > 1)(lambda: run(_chain_state(loop_info.local_index, count)))

      @plgpu.nd_loop(((num_row_tiles - computed) * column_blocks,), collective_axes="sm")
      def _(loop_info):
        index = loop_info.index[0]
        ti, ci = computed + lax.div(index, column_blocks), lax.rem(index, column_blocks)
        _, block, first, end = read_tile(ti)

        @pl.when((end > first) & (wg < 2))
        def _():
          store(block, first, end, ci, jnp.zeros((ROWS, n), jnp.float32))

      @pl.when(wg < 2)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, allocations, plgpu.SMEM((2, ROWS, n), out_gmem.dtype),
                  collective_axes="wg")

  # The table goes in flat (the kernel reads it as scalars), and apart from it the count of
  # its tiles that compute (a group's rows): appended to the table, the count's sum was fused
  # into the table's concatenation as one thread's serial loop over the tiles (0.17 ms per
  # call on an H200, 5 ms of a training step).
  computed = jnp.sum((tiles[0] < num_groups) & (tiles[3] > tiles[2]), dtype=jnp.int32)
  out = _warp_specialized(body, jax.ShapeDtypeStruct((num_rows, width), rows.dtype),
                          tiles.reshape(-1), computed[None], rows, w)
  return typed_like(out, rows, w, tiles)


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "parts"))
def weight_product(rows: Float[Array, "M K"], dy: Float[Array, "M N"], steps: Int[Array, "4 E"],
                   *, out_dtype=jnp.float32, blocks: RaggedBlocks = RaggedBlocks(),
                   parts: int = 1) -> tuple[Float[Array, "E K N/parts"], ...]:
  """dw[g] = rows[g]^T @ dy[g] over each group's rows (`steps`: group_steps), in out_dtype;
  zeros for empty groups. Written as `parts` arrays of N / parts columns each (the gradients
  of weights used side by side: one kernel over the whole width, no copy to split it)."""
  plgpu = mosaic.plgpu()
  num_rows, contraction = rows.shape
  width = dy.shape[1]
  num_groups = steps.shape[1]
  _check(num_rows, k=contraction, n=width)
  n = mosaic.tile_width(blocks.weight_n, width, per_block=2)
  part_width = width // parts
  if part_width * parts != width or part_width % n:
    raise ValueError(f"weight_product: {parts} parts of {width} columns need each a multiple of "
                     f"{n} columns")
  k_blocks, column_blocks = contraction // ROWS, width // (2 * n)
  num_tiles = num_groups * k_blocks * column_blocks
  operand = mosaic.swizzled(rows.dtype, ROWS)
  b_operand = mosaic.swizzled(rows.dtype, 2 * n)
  specs = [plgpu.BlockSpec((STEP, ROWS), lambda s: (s, 0), transforms=operand),
           plgpu.BlockSpec((STEP, 2 * n), lambda s: (s, 0), transforms=b_operand)]
  half = ROWS // 2   # the float32 tile is stored in two halves of 64 rows (shared memory)
  in_flight = _in_flight(blocks.weight_steps,
                         (ROWS + 2 * n) * STEP * jnp.dtype(rows.dtype).itemsize,
                         2 * half * n * jnp.dtype(out_dtype).itemsize)

  def body(steps_gmem, rows_gmem, dy_gmem, *out_gmems):
    wg = lax.axis_index("wg")
    mine = pl.ds(wg * n, n)
    ignore = lambda *_, **__: None
    # (a static grid shorter than the steps in flight would allocate fewer buffers)
    allocations = _pipeline(ignore, ignore, 1 << 20, specs, in_flight).get_allocations(
        rows_gmem.at[pl.ds(0, STEP), pl.ds(0, ROWS)], dy_gmem.at[pl.ds(0, STEP), pl.ds(0, 2 * n)])

    def scope(pipeline_allocations, out_smem):
      @plgpu.nd_loop((num_tiles,), collective_axes="sm")
      def _(loop_info):
        tile = loop_info.index[0]
        group = lax.div(tile, k_blocks * column_blocks)
        ki = lax.div(lax.rem(tile, k_blocks * column_blocks), column_blocks)
        ci = lax.rem(tile, column_blocks)
        first_step, count = steps_gmem[group], steps_gmem[num_groups + group]
        start, end = steps_gmem[2 * num_groups + group], steps_gmem[3 * num_groups + group]
        column = ci * 2 * n + wg * n   # this warpgroup's first, within one part's columns
        part_of_tile = lax.div(column, part_width)
        columns = pl.ds(column - part_of_tile * part_width, n)

        def store(values):
          for row_half in range(ROWS // half):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[wg] = values[row_half * half:(row_half + 1) * half].astype(out_dtype)
            plgpu.commit_smem()
            for part, out_gmem in enumerate(out_gmems):
              @pl.when(part_of_tile == part)
              def _(out_gmem=out_gmem, row_half=row_half):
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg],
                    out_gmem.at[group, pl.ds(ki * ROWS + row_half * half, half), columns])

        def step(index, a_smem, b_smem, acc_ref):
          b = b_smem.at[:, mine]
          row = (first_step + index[0]) * STEP

          @pl.when((row < start) | (row + STEP > end))
          def _():   # rows of the neighbouring groups: zero this warpgroup's columns of them
            values = b[...]
            index_of_row = plgpu.layout_cast(
                lax.broadcasted_iota(jnp.int32, (STEP, n), 0), plgpu.Layout.WGMMA) + row
            inside = (index_of_row >= start) & (index_of_row < end)
            b[...] = jnp.where(inside, values, jnp.zeros_like(values))
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_smem, (1, 0)), b)
          plgpu.wgmma_wait(0)   # the slot is released when the step returns
          return acc_ref

        # Windows from the group's first step; they reach past the arrays' ends, where the
        # pipeline never reads (it runs `count` steps).
        window = pl.ds(first_step * STEP, num_rows)

        @pl.when(count > 0)
        def _():
          _pipeline(step, _accumulate(n, store), count, specs, in_flight)(
              rows_gmem.at[window, pl.ds(ki * ROWS, ROWS)],
              dy_gmem.at[window, pl.ds(ci * 2 * n, 2 * n)], allocations=pipeline_allocations)

        @pl.when((count == 0) & (wg < 2))
        def _():
          store(jnp.zeros((ROWS, n), jnp.float32))

      @pl.when(wg < 2)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, allocations,
                  plgpu.SMEM((2, half, n), out_dtype, transforms=mosaic.swizzled(out_dtype, n)),
                  collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct((num_groups, contraction, part_width), out_dtype),) * parts
  outs = _warp_specialized(body, out_type, steps.reshape(-1), rows, dy)
  return tuple(typed_like(out, rows, dy, steps) for out in outs)


# ---- the same contracts in XLA: the obviously correct references (any backend) --------------


def row_product_reference(rows, w, tiles, *, transpose_w=False, blocks=RaggedBlocks()):
  """row_product tile by tile in float32: each tile's block times its group's weight, its
  rows first..end kept."""
  del blocks
  num_groups = w.shape[0]
  w = jnp.swapaxes(w, 1, 2) if transpose_w else w
  group, block, first, end = tiles
  blocks_of_rows = rows.astype(jnp.float32).reshape(-1, ROWS, rows.shape[1])[block]
  weights = w.astype(jnp.float32)[jnp.minimum(group, num_groups - 1)]
  products = jnp.einsum("trk,tkn->trn", blocks_of_rows, weights, precision=lax.Precision.HIGHEST)
  row = jnp.arange(ROWS)
  kept = (row >= first[:, None]) & (row < end[:, None]) & (group < num_groups)[:, None]
  out = jnp.zeros((rows.shape[0] // ROWS, ROWS, w.shape[2]), jnp.float32)
  out = out.at[block].add(jnp.where(kept[..., None], products, 0))
  return out.reshape(rows.shape[0], -1).astype(rows.dtype)


def weight_product_reference(rows, dy, steps, *, out_dtype=jnp.float32, blocks=RaggedBlocks(),
                             parts=1):
  """weight_product in float32: each group's rows (from its steps' first and end rows)."""
  del blocks
  _, _, start, end = steps
  row = jnp.arange(rows.shape[0])
  member = ((row[None] >= start[:, None]) & (row[None] < end[:, None])).astype(jnp.float32)
  dw = jnp.einsum("em,mk,mn->ekn", member, rows.astype(jnp.float32), dy.astype(jnp.float32),
                  precision=lax.Precision.HIGHEST).astype(out_dtype)
  return tuple(jnp.split(dw, parts, axis=-1))


def _products(kernels: bool):
  return ((row_product, weight_product) if kernels
          else (row_product_reference, weight_product_reference))


# ---- y = rows @ w[g], differentiable -----------------------------------------------------


def _forward(rows, w, group_sizes, blocks, kernels):
  """The product and what the backward pass keeps: rows, the weights side by side in rows'
  dtype (the cast made here), the tables, and an empty slice of each weight (its shape, dtype
  and type)."""
  product, _ = _products(kernels)
  tiles, steps = row_tiles(group_sizes, rows.shape[0]), group_steps(group_sizes)
  parts = w if isinstance(w, tuple) else (w,)
  weight = jnp.concatenate([part.astype(rows.dtype) for part in parts], axis=-1)
  out = product(rows, weight, tiles, blocks=blocks)
  return out, (rows, weight, tiles, steps, jax.tree.map(lambda part: part[:0], w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(rows: Float[Array, "M K"],
                   w: Float[Array, "E K N"] | tuple[Float[Array, "E K N/P"], ...],
                   group_sizes: Int[Array, "E"], blocks: RaggedBlocks = RaggedBlocks(),
                   kernels: bool = True) -> Float[Array, "M N"]:
  """ragged_dot(rows, w, group_sizes) in rows' dtype (bf16), zeros for rows past the groups;
  differentiable in rows and w, w's gradient made in w's dtype (float32 master weights get
  theirs from the kernel's accumulator, not through a bf16 copy). `w` may be a tuple of P
  weights of equal shape used side by side (concatenated along N: gate and up as one
  product); each gets its own gradient from the one kernel. `kernels=False`: the XLA
  references of the kernels' contracts (any backend)."""
  return _forward(rows, w, group_sizes, blocks, kernels)[0]


def _backward(blocks, kernels, residuals, dy):
  product, weight_gradient = _products(kernels)
  rows, weight, tiles, steps, w_like = residuals
  dy = dy.astype(rows.dtype)
  drows = product(dy, weight, tiles, transpose_w=True, blocks=blocks)
  parts = w_like if isinstance(w_like, tuple) else (w_like,)
  dws = weight_gradient(rows, dy, steps, out_dtype=parts[0].dtype, blocks=blocks,
                        parts=len(parts))
  dws = tuple(gradient_like(dw, like) for dw, like in zip(dws, parts))
  return gradient_like(drows, rows), dws if isinstance(w_like, tuple) else dws[0], None


grouped_matmul.defvjp(_forward, _backward)
