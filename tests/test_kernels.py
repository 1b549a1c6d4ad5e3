"""The grouped-matmul kernels in Pallas interpret mode, and the tiled XLA matmul, against
jax.lax.ragged_dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.dispatch import (DispatchSettings, SwiGLUExperts, dropless_dispatch,
                              reference_dispatch)
from moe_jax.kernels import grouped_matmul as gm
from moe_jax.kernels import ragged_mosaic as rm
from moe_jax.settings import ConfigError

SMALL = gm.Blocks(m=16, n=16, k=16)


def test_layout_pads_each_group_to_the_row_tile_by_hand():
  layout = gm.group_layout(jnp.array([3, 0, 17, 1]), num_rows=22, block_m=16)
  # Groups of 3, 0, 17, 1 rows -> 16, 0, 32, 16 padded rows: tiles 0 | - | 1, 2 | 3, then spare.
  assert gm.padded_rows(22, 4, 16) == 96
  np.testing.assert_array_equal(layout.tile_group, [0, 2, 2, 3, 4, 4])
  np.testing.assert_array_equal(layout.group_tile_start, [0, 1, 1, 3, 4])
  np.testing.assert_array_equal(layout.padded_row[:4], [0, 1, 2, 16])
  np.testing.assert_array_equal(layout.padded_row[20:], [48, 96])   # row 21 is in no group
  assert layout.padded_source[3] == 22 and layout.padded_source[48] == 20


@pytest.mark.parametrize("sizes", [
    [30, 0, 45, 1, 20],          # an empty expert, a single row, rows past the groups
    [0, 0, 100, 0, 0],           # everything on one expert
    [20, 20, 20, 20, 20],        # balanced
], ids=["mixed", "one_expert", "balanced"])
def test_kernels_match_ragged_dot_with_gradients(sizes):
  rng = np.random.default_rng(sum(sizes))
  rows = jnp.asarray(rng.normal(size=(100, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 32, 48)), jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  cotangent = jnp.asarray(rng.normal(size=(100, 48)), jnp.float32)

  def with_grads(fn):
    out, vjp = jax.vjp(fn, rows, w)
    return (out, *vjp(cotangent))

  def tiled(r, w):
    layout = gm.group_layout(group_sizes, r.shape[0], 16)
    return gm.unpad(gm.tiled_dot(layout, 16)(gm.pad(r, layout), w), layout)

  want = with_grads(lambda r, w: jax.lax.ragged_dot(r, w, group_sizes))
  for fn in (lambda r, w: gm.grouped_matmul(r, w, group_sizes, blocks=SMALL, interpret=True),
             tiled):
    got = with_grads(fn)
    for name, a, b in zip(("out", "d_rows", "d_w"), got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def test_bf16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.normal(size=(64, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(2, 256, 32)) / 16, jnp.bfloat16)
  sizes = jnp.array([40, 24])
  got = gm.grouped_matmul(rows, w, sizes, blocks=SMALL, interpret=True).astype(jnp.float32)
  want = jax.lax.ragged_dot(rows.astype(jnp.float32), w.astype(jnp.float32), sizes)
  assert got.dtype == jnp.float32 and float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


@pytest.mark.parametrize("implementation", ["interpret", "tiles"])
def test_dropless_dispatch_through_the_kernels_matches_the_reference(implementation):
  rng = np.random.default_rng(1)
  tokens, width, hidden, experts, k = 48, 32, 48, 8, 2
  x = jnp.asarray(rng.normal(size=(tokens, width)), jnp.float32)
  weights = SwiGLUExperts(*(jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32) for s in
                            [(experts, width, hidden), (experts, width, hidden),
                             (experts, hidden, width)]), implementation=implementation)
  ids = jnp.asarray(rng.choice(3, (tokens, k)), jnp.int32)   # very skewed: 3 of 8 experts used
  ids = ids.at[:, 1].set((ids[:, 0] + 1) % 3)
  gates = jnp.asarray(rng.random((tokens, k)), jnp.float32)
  loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, ids, gates, w).output))
  assert gm.chosen_implementation(width, hidden, weights.implementation) == implementation
  got = jax.value_and_grad(loss(dropless_dispatch), (0, 1))(x, weights)
  want = jax.value_and_grad(loss(reference_dispatch), (0, 1))(x, weights)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ragged_mosaic_tables_by_hand():
  """Which rows each tile of the Mosaic kernels holds: groups of 3, 0, 200 and 1 rows in 256
  (128-row blocks; rows 204-255 in no group)."""
  tiles = rm.row_tiles(jnp.array([3, 0, 200, 1]), 256)
  np.testing.assert_array_equal(tiles.T, [
      [0, 0, 0, 3],       # group 0: rows 0-2 of block 0
      [2, 0, 3, 128],     # group 2 starts in block 0 ...
      [2, 1, 0, 75],      # ... and ends in block 1
      [3, 1, 75, 76],     # group 3: one row
      [4, 1, 76, 128],    # past the groups (group E): written as zeros
      [4, 0, 0, 0]])      # a spare tile: no rows
  steps = rm.group_steps(jnp.array([3, 0, 200, 1]))
  np.testing.assert_array_equal(steps.T, [[0, 1, 0, 3], [0, 0, 3, 3], [0, 4, 3, 203],
                                          [3, 1, 203, 204]])


def test_ragged_mosaic_tables_give_every_row_to_its_group_once():
  """Random group sizes, many of them at or next to the kernels' 64- and 128-row boundaries:
  the row tiles hold every row once, with its group (rows past the groups with group E, to be
  zeroed), and each group's 64-row steps cover exactly its rows' steps."""
  rng = np.random.default_rng(7)
  row_tiles, group_steps = jax.jit(rm.row_tiles, static_argnums=1), jax.jit(rm.group_steps)
  for case in range(40):
    num_groups = int(rng.choice([1, 3, 8, 33]))
    num_rows = 128 * int(rng.integers(1, 9))
    sizes = rng.choice([0, 1, 63, 64, 65, 127, 128, 129], num_groups)
    while sizes.sum() > num_rows:
      sizes[rng.integers(num_groups)] //= 2
    group_of_row = np.concatenate([np.repeat(np.arange(num_groups), sizes),
                                   np.full(num_rows - sizes.sum(), num_groups)])
    group, block, first, end = np.asarray(row_tiles(jnp.asarray(sizes, jnp.int32), num_rows))
    seen = np.zeros(num_rows, int)
    for g, b, lo, hi in zip(group, block, first, end):
      rows = b * 128 + np.arange(lo, hi)
      seen[rows] += 1
      assert (group_of_row[rows] == g).all(), (case, sizes, g, b, lo, hi)
    assert (seen == 1).all(), (case, sizes, seen)
    # row_product computes a prefix of the table (its chain of pipelines must not skip):
    # every tile with a group's rows comes before every other tile.
    computes = (group < num_groups) & (end > first)
    assert not (computes[1:] & ~computes[:-1]).any(), (case, sizes, group, first, end)
    first_step, steps, start, stop = np.asarray(group_steps(jnp.asarray(sizes, jnp.int32)))
    ends = np.cumsum(sizes)
    np.testing.assert_array_equal(start, ends - sizes)
    np.testing.assert_array_equal(stop, ends)
    for g in range(num_groups):
      want = set(range(start[g] // 64, -(-stop[g] // 64))) if sizes[g] else set()
      assert set(range(first_step[g], first_step[g] + steps[g])) == want, (case, sizes, g)


def test_ragged_mosaic_band_order_visits_every_tile_once():
  """row_product's tile order: bands of `band` row tiles walked column block by column
  block, the last band shorter; every (row tile, column block) exactly once."""
  order = lambda band, row_tiles, column_blocks: [
      tuple(int(v) for v in rm._band_order(jnp.int32(i), band, jnp.int32(row_tiles),
                                           column_blocks))
      for i in range(row_tiles * column_blocks)]
  # By hand: 5 row tiles, 2 column blocks, bands of 2 (the last band holds row tile 4 alone).
  assert order(2, 5, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1),
                            (4, 0), (4, 1)]
  for band, row_tiles, column_blocks in [(8, 37, 3), (16, 5, 7), (1, 4, 4), (8, 64, 1)]:
    visits = order(band, row_tiles, column_blocks)
    assert sorted(visits) == [(t, c) for t in range(row_tiles) for c in range(column_blocks)]


def test_ragged_mosaic_pipeline_plan():
  """Steps in flight, and the chain of pipelines only for short contractions whose steps a
  count of steps in flight (> 1) divides."""
  assert rm._pipeline_plan(16, 4, chain_steps=16) == (4, True)
  assert rm._pipeline_plan(6, 4, chain_steps=16) == (3, True)      # 384 wide: 6 steps
  assert rm._pipeline_plan(22, 4, chain_steps=32) == (2, True)     # 1408 wide: 22 steps
  assert rm._pipeline_plan(7, 4, chain_steps=16) == (4, False)     # a prime: no chain
  assert rm._pipeline_plan(32, 4, chain_steps=16) == (4, False)    # long: no chain
  assert rm._pipeline_plan(2, 4, chain_steps=0) == (2, False)      # no more than its steps


@pytest.mark.parametrize("sizes", [[3, 0, 200, 1], [0, 256, 0, 0], [64, 64, 64, 64]],
                         ids=["mixed", "one_expert", "balanced"])
def test_ragged_mosaic_contract_matches_ragged_dot(sizes):
  """The Mosaic kernels' contracts (their XLA references, through the custom VJP the kernels
  run in) against ragged_dot on the same bf16 values: output and data gradient to bf16
  rounding, the float32 master weight's gradient in float32 to float32 rounding."""
  rng = np.random.default_rng(len(sizes) + sizes[0])
  rows = jnp.asarray(rng.normal(size=(256, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 128, 256)) / 11, jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16).astype(jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  inside = (jnp.arange(256) < sum(sizes))[:, None]

  def reference(r, w):   # w: the bf16 values in float32 (a cast here would round dw to bf16)
    return jnp.where(inside, jax.lax.ragged_dot(r.astype(jnp.float32), w, group_sizes,
                                                precision=jax.lax.Precision.HIGHEST), 0)

  def with_grads(fn, w):
    out, vjp = jax.vjp(fn, rows, w)
    return (out, *vjp(cotangent))

  got = with_grads(lambda r, w: rm.grouped_matmul(r, w, group_sizes, kernels=False)
                   .astype(jnp.float32), w)
  want = with_grads(reference, w.astype(jnp.bfloat16).astype(jnp.float32))
  assert got[2].dtype == jnp.float32
  for name, a, b, tolerance in zip(("out", "d_rows", "d_w"), got, want, (8e-3, 8e-3, 1e-5)):
    error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    assert error < tolerance, (name, error)


def test_ragged_mosaic_weights_side_by_side_get_their_own_gradients():
  """Gate and up as one product (a tuple of weights used side by side): the output is each
  weight's product next to the other's, and each float32 weight gets its own gradient."""
  rng = np.random.default_rng(7)
  rows = jnp.asarray(rng.normal(size=(256, 128)), jnp.bfloat16)
  pair = tuple(jnp.asarray(rng.normal(size=(3, 128, 128)) / 11, jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16).astype(jnp.float32)
  group_sizes = jnp.asarray([100, 0, 140], jnp.int32)

  def reference(r, pair):
    return jnp.concatenate([jax.lax.ragged_dot(r.astype(jnp.float32), w, group_sizes,
                                               precision=jax.lax.Precision.HIGHEST)
                            for w in pair], axis=-1)

  out, vjp = jax.vjp(lambda r, pair: rm.grouped_matmul(r, pair, group_sizes, kernels=False)
                     .astype(jnp.float32), rows, pair)
  d_rows, d_pair = vjp(cotangent)
  bf16_pair = tuple(w.astype(jnp.bfloat16).astype(jnp.float32) for w in pair)
  want_out, want_vjp = jax.vjp(reference, rows, bf16_pair)
  want_rows, want_pair = want_vjp(cotangent)
  relative = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
  assert relative(out[:240], want_out[:240]) < 8e-3 and relative(d_rows, want_rows) < 8e-3
  for got, want in zip(d_pair, want_pair):
    assert got.dtype == jnp.float32 and relative(got, want) < 1e-5


def test_implementation_choice():
  assert gm.chosen_implementation(64, 128) == "tiles"        # auto on CPU
  assert gm.chosen_implementation(64, 100, "tiles") == "tiles"      # any widths
  assert gm.chosen_implementation(64, 128, "pallas") == "pallas"
  assert gm.chosen_implementation(64, 100, "pallas") == "xla"        # not a multiple of 16
  assert gm.chosen_implementation(1024, 384, "mosaic") == "mosaic"
  assert gm.chosen_implementation(1024, 320, "mosaic") == "pallas"   # mosaic: multiples of 128
  assert gm.chosen_implementation(1024, 384, "mosaic", jnp.float32) == "pallas"   # 16-bit only
  with pytest.raises(ConfigError, match="dispatch.grouped_matmul='cuda' is unknown"):
    DispatchSettings(strategy="dropless", grouped_matmul="cuda")


def test_layers_share_each_kernels_lowering():
  """Each kernel call is lowered once per shapes, however many layers make it: an unrolled
  model's compile time does not grow by one kernel lowering per layer (docs/performance.md)."""
  import functools
  import re

  from configs.default import get_config
  from moe_jax import steps
  from moe_jax.model import ModelSpec

  tiny = ModelSpec.from_config(get_config("tiny"))
  kernels, calls = {}, {}
  for layers in (2, 4):
    spec = tiny.replace(num_layers=layers, num_dense_layers=0, dispatch=tiny.dispatch.replace(
        strategy="dropless", grouped_matmul="interpret"))
    tx = steps.make_optimizer(1e-3, 0.9, 0.95, 0.0, 1.0)
    graphdef, state = steps.init_state(spec, tx, 0)
    step = functools.partial(steps.train_step, graphdef=graphdef, tx=tx)
    text = jax.jit(step).lower(state, jnp.zeros((2, 33), jnp.int32)).as_text()
    kernels[layers] = set(re.findall(r"func\.func private @(t?gmm_padded\w*)", text))
    calls[layers] = len(re.findall(r"call @t?gmm_padded", text))
  # Per layer: 2 forward products (gate and up as one), 2 x 2 backward ones (through the rows
  # and the weights); each of a layer's 6 products has its own shape.
  assert len(kernels[2]) == 6 and kernels[4] == kernels[2], kernels
  assert (calls[2], calls[4]) == (2 * 6, 4 * 6), calls


def test_a_kernels_weight_gradient_sums_over_the_token_axes_its_weight_does_not_split():
  """Inside a shard_map, a custom VJP's weight gradient made from tokens that differ along
  `data` and `expert` belongs to a weight that does not: `gradient_like` sums it over both,
  as autodiff of the plain product does (typing it without the sum fails the VJP's check)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moe_jax import parallel
  from moe_jax.manual_axes import gradient_like

  @jax.custom_vjp
  def product(x, w):
    return x @ w

  def forward(x, w):
    return product(x, w), (x, w)

  def backward(residuals, dy):
    x, w = residuals
    return gradient_like(dy @ w.T, x), gradient_like(x.T @ dy, w)

  product.defvjp(forward, backward)
  mesh = parallel.make_mesh(2, 4)
  x = jax.random.normal(jax.random.key(0), (16, 6))
  w = jax.random.normal(jax.random.key(1), (6, 5))
  loss = lambda fn: lambda x, w: jnp.sum(jax.shard_map(
      lambda x, w: jax.lax.psum(jnp.sum(fn(x, w) ** 2), ("data", "expert")), mesh=mesh,
      in_specs=(P(("data", "expert")), P()), out_specs=P())(x, w))
  with jax.set_mesh(mesh):
    placed = jax.device_put(x, NamedSharding(mesh, P(("data", "expert")))), w
    got = jax.jit(jax.grad(loss(product), argnums=(0, 1)))(*placed)
  expected = jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), argnums=(0, 1))(x, w)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
