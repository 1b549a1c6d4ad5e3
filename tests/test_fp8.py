"""FP8 experts: e4m3 quantization with DeepSeek-V3's fine-grained scaling, checked against a
NumPy reference (scales exact, values bit for bit, round trips within e4m3's rounding bound),
the three products of fp8_matmul against the reference's, the experts' ragged FP8 path against
a loop over experts, and a tiny training run against bf16."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moe_jax.dispatch.experts import SwiGLUExperts
from moe_jax.kernels import fp8

TILE, E4M3_MAX = 128, np.float32(448.0)
INVERSE_MAX = np.float32(1 / 448)   # a scale is amax * float32(1/448)
# e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself; below the smallest
# normal (2^-6 in scaled units) the spacing is 2^-9, so the rounding error is at most 2^-10.
RELATIVE_ROUNDING, SUBNORMAL_ROUNDING = 2.0 ** -4, 2.0 ** -10


# ---- the NumPy reference --------------------------------------------------------------------


def np_quantize_rows(x):
  """1 x 128 tiles along the last axis: (e4m3 values [..., M, K padded], scales [..., M, T])."""
  x = np.asarray(x, np.float32)
  width = -(-x.shape[-1] // TILE) * TILE
  padded = np.zeros(x.shape[:-1] + (width,), np.float32)
  padded[..., :x.shape[-1]] = x
  tiles = padded.reshape(x.shape[:-1] + (width // TILE, TILE))
  amax = np.abs(tiles).max(axis=-1)
  scales = np.where(amax > 0, amax * INVERSE_MAX, np.float32(1)).astype(np.float32)
  values = np.clip(tiles / scales[..., None], -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
  return values.reshape(padded.shape), scales


def np_dequantize_rows(values, scales):
  tiles = values.astype(np.float64).reshape(scales.shape + (TILE,))
  return (tiles * scales[..., None]).reshape(values.shape)


def np_quantize_blocks(w):
  """128 x 128 blocks over the last two axes."""
  w = np.asarray(w, np.float32)
  rows, columns = (-(-n // TILE) * TILE for n in w.shape[-2:])
  padded = np.zeros(w.shape[:-2] + (rows, columns), np.float32)
  padded[..., :w.shape[-2], :w.shape[-1]] = w
  blocks = padded.reshape(w.shape[:-2] + (rows // TILE, TILE, columns // TILE, TILE))
  amax = np.abs(blocks).max(axis=(-3, -1))
  scales = np.where(amax > 0, amax * INVERSE_MAX, np.float32(1)).astype(np.float32)
  values = np.clip(blocks / scales[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
  return values.astype(ml_dtypes.float8_e4m3fn).reshape(padded.shape), scales


def np_dequantize_blocks(values, scales):
  *batch, rows, columns = values.shape
  blocks = values.astype(np.float64).reshape(*batch, rows // TILE, TILE, columns // TILE, TILE)
  return (blocks * scales[..., :, None, :, None]).reshape(values.shape)


def np_rows(x):
  return np_dequantize_rows(*np_quantize_rows(x))


def np_blocks(w):
  return np_dequantize_blocks(*np_quantize_blocks(w))


def np_fp8_products(x, w, dy):
  """DeepSeek-V3's three FP8 products, in float64 from the quantized operands:
  y = Q_rows(x) Q_blocks(w), dx = Q_rows(dy) Q_blocks(w)^T, dw = Q_rows(x^T) Q_rows(dy^T)^T."""
  m, k = x.shape[-2:]
  n = w.shape[-1]
  weight = np_blocks(w)
  y = (np_rows(x) @ weight)[..., :m, :n]
  dx = (np_rows(dy) @ np.swapaxes(weight, -1, -2))[..., :m, :k]
  dw = (np_rows(np.swapaxes(x, -1, -2)) @ np.swapaxes(np_rows(np.swapaxes(dy, -1, -2)), -1, -2))
  return y, dx, dw[..., :k, :n]


def spread_values(rng, shape):
  """Normal values times 10^[-3, 3] per row: tiles of very different magnitudes, some entries
  below e4m3's normal range after scaling, and one all-zero row."""
  x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape[:-1] + (1,))
  x[..., 0, :] = 0.0
  return x.astype(np.float32)


def bits(values):
  return np.asarray(values).view(np.uint8)


# ---- quantization ---------------------------------------------------------------------------


def test_row_tiles_match_the_reference_scales_exactly_and_values_bit_for_bit():
  x = spread_values(np.random.default_rng(0), (3, 6, 300))   # 300 columns: 3 tiles, the last part padding
  values, scales = np_quantize_rows(x)
  q = fp8.quantize_rows(jnp.asarray(x))
  assert q.values.dtype == jnp.float8_e4m3fn and q.scales.shape == (3, 6, 3)
  np.testing.assert_array_equal(np.asarray(q.scales), scales)
  np.testing.assert_array_equal(bits(q.values), bits(values))
  assert np.all(np.asarray(q.scales)[:, 0] == 1.0)              # the zero row's tiles
  # The scale maps each tile's largest magnitude to 448, e4m3's largest value.
  assert np.abs(q.values.astype(np.float32)).reshape(3, 6, 3, TILE)[:, 1:].max(axis=-1).min() == 448


def test_weight_blocks_match_the_reference_scales_exactly_and_values_bit_for_bit():
  w = spread_values(np.random.default_rng(1), (2, 200, 300))
  values, scales = np_quantize_blocks(w)
  q = fp8.quantize_blocks(jnp.asarray(w))
  assert q.values.shape == (2, 256, 384) and q.scales.shape == (2, 2, 3)
  np.testing.assert_array_equal(np.asarray(q.scales), scales)
  np.testing.assert_array_equal(bits(q.values), bits(values))


@pytest.mark.parametrize("kind", ["rows", "blocks"])
def test_a_round_trip_errs_at_most_by_e4m3_rounding(kind):
  x = spread_values(np.random.default_rng(2), (4, 130, 260))
  quantize, dequantize = ((fp8.quantize_rows, fp8.dequantize_rows) if kind == "rows"
                          else (fp8.quantize_blocks, fp8.dequantize_blocks))
  q = quantize(jnp.asarray(x))
  back = np.asarray(dequantize(q))[..., :130, :260]
  scale = (np.repeat(np.asarray(q.scales), TILE, axis=-1) if kind == "rows" else
           np.repeat(np.repeat(np.asarray(q.scales), TILE, axis=-1), TILE, axis=-2))[..., :130, :260]
  bound = np.maximum(np.abs(x) * RELATIVE_ROUNDING, scale * SUBNORMAL_ROUNDING) * (1 + 1e-6)
  error = np.abs(back - x)
  assert np.all(error <= bound)
  assert error.max() > 0                                      # it does round
  assert np.all(back[..., 0, :] == 0)                         # zeros stay zero


# ---- the products ---------------------------------------------------------------------------


def test_fp8_matmul_and_both_gradients_equal_the_reference_fp8_products():
  rng = np.random.default_rng(3)
  x = spread_values(rng, (2, 150, 200))          # two batch entries (experts), rows, K
  w = rng.standard_normal((2, 200, 136)).astype(np.float32) * 0.05
  dy = spread_values(rng, (2, 150, 136))
  y, vjp = jax.vjp(fp8.fp8_matmul, jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  expected_y, expected_dx, expected_dw = np_fp8_products(x, w, dy)
  for got, expected in ((y, expected_y), (dx, expected_dx), (dw, expected_dw)):
    assert got.shape == expected.shape
    scale = np.abs(expected).max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * scale.max())


def test_an_fp8_product_errs_at_most_by_both_operands_rounding():
  """|x w - Q(x) Q(w)| <= (2 * 2^-4 + 2^-8) |x| |w| elementwise, for normal-range operands."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 384)).astype(np.float32)
  w = rng.standard_normal((384, 256)).astype(np.float32)
  got = np.asarray(fp8.fp8_matmul(jnp.asarray(x), jnp.asarray(w)), np.float64)
  exact = x.astype(np.float64) @ w.astype(np.float64)
  slack = np.abs(x).max() * np.abs(w).max() * x.shape[1] * SUBNORMAL_ROUNDING * 2 ** -6
  bound = (2 * RELATIVE_ROUNDING + RELATIVE_ROUNDING ** 2) * (np.abs(x) @ np.abs(w)) + slack
  assert np.all(np.abs(got - exact) <= bound)
  relative = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  assert 1e-3 < relative < 0.05, relative                     # quantized, and close


def test_a_bf16_input_gives_a_bf16_output_and_float32_weights_a_float32_gradient():
  x = jnp.ones((4, 8), jnp.bfloat16)
  w = jnp.ones((8, 3), jnp.float32)
  y, vjp = jax.vjp(fp8.fp8_matmul, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_array_equal(np.asarray(y, np.float32), 8.0)


# ---- the experts ----------------------------------------------------------------------------


def _value_and_vjp(fn, cotangent, *args):
  """fn(*args) and its vector-Jacobian product with `cotangent`, compiled as one program."""
  def both(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)
  return jax.jit(both)(*args)


def test_ragged_fp8_experts_equal_each_expert_alone_in_values_and_gradients():
  """The ragged path pads each expert's rows to 128-row tiles; the reference runs each expert's
  rows through its own FP8 SwiGLU (padded the same way by fp8_matmul itself)."""
  rng = np.random.default_rng(5)
  num_experts, width, hidden = 4, 48, 40
  group_sizes = np.array([130, 0, 7, 100])          # a group over one tile, an empty one
  rows = jnp.asarray(rng.standard_normal((250, width)), jnp.float32)   # 13 rows past the groups
  weights = [jnp.asarray(rng.standard_normal(shape) * 0.2, jnp.float32)
             for shape in [(num_experts, width, hidden)] * 2 + [(num_experts, hidden, width)]]

  def ragged(rows, w_gate, w_up, w_down):
    experts = SwiGLUExperts(w_gate, w_up, w_down, fp8=True)
    return experts.ragged(rows, jnp.asarray(group_sizes))

  def one_by_one(rows, w_gate, w_up, w_down):
    outputs, start = [], 0
    for e, size in enumerate(group_sizes):
      if not size:
        continue
      mine = rows[start:start + size]
      alone = SwiGLUExperts(w_gate[e:e + 1], w_up[e:e + 1], w_down[e:e + 1], fp8=True)
      outputs.append(alone(mine[None])[0])
      start += size
    outputs.append(jnp.zeros((rows.shape[0] - start, width), rows.dtype))
    return jnp.concatenate(outputs)

  cotangent = jnp.asarray(rng.standard_normal((250, width)), jnp.float32)
  got, got_grads = _value_and_vjp(ragged, cotangent, rows, *weights)
  expected, expected_grads = _value_and_vjp(one_by_one, cotangent, rows, *weights)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  # And FP8 is not the unquantized product: the two differ by rounding.
  plain = SwiGLUExperts(*weights, implementation="tiles").ragged(rows, jnp.asarray(group_sizes))
  difference = np.abs(np.asarray(got) - np.asarray(plain)).max()
  assert 1e-4 < difference < 0.1 * np.abs(np.asarray(plain)).max()


# ---- training -------------------------------------------------------------------------------


def _training_losses(tmp_path, name: str, fp8_experts: bool) -> np.ndarray:
  from configs.default import get_config
  from moe_jax import metrics
  from moe_jax.train import train_and_evaluate
  config = get_config("tiny,steps=100")
  config.model.compute_dtype = "bfloat16"
  config.dispatch.fp8_experts = fp8_experts
  config.train.update(log_every=10, eval_every=100, eval_batches=2, checkpoint_every=1000,
                      sample_tokens=0)
  train_and_evaluate(config, tmp_path / name)
  records = metrics.read_jsonl(tmp_path / name / "metrics.jsonl")
  return np.array([r["cross_entropy"] for r in records if "cross_entropy" in r])


def test_a_tiny_run_with_fp8_experts_tracks_bf16(tmp_path):
  """The same 100 steps in bf16 with and without FP8 experts: the training loss stays within
  0.5% of bf16's at every logged step, and is not bf16's (the FP8 path ran)."""
  bf16 = _training_losses(tmp_path, "bf16", False)
  fp8_run = _training_losses(tmp_path, "fp8", True)
  assert len(bf16) == len(fp8_run) == 10
  relative = np.abs(fp8_run - bf16) / bf16
  print("FP8 / bf16 - 1 per logged step:", np.round(fp8_run / bf16 - 1, 5))
  assert relative.max() < 0.005, relative
  assert relative.max() > 0, "the FP8 run gave bf16's losses exactly"


def test_the_fp8_gpu_kernels_in_interpret_mode_equal_the_xla_numerics():
  """The Pallas FP8 kernels (scales applied per 128-chunk inside the accumulation) against
  fp8_matmul over the same row tiles: values and both gradients, with widths that need padding,
  an empty expert, a group over two tiles and rows past the groups."""
  rng = np.random.default_rng(6)
  num_experts, width, hidden = 3, 200, 136
  group_sizes = jnp.asarray([130, 0, 60])
  rows = jnp.asarray(spread_values(rng, (200, width)))
  weights = [jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)
             for shape in [(num_experts, width, hidden)] * 2 + [(num_experts, hidden, width)]]

  def layer(implementation):
    return lambda rows, *w: SwiGLUExperts(*w, implementation=implementation,
                                          fp8=True).ragged(rows, group_sizes)

  cotangent = jnp.asarray(rng.standard_normal((200, width)), jnp.float32)
  got, got_grads = _value_and_vjp(layer("interpret"), cotangent, rows, *weights)
  expected, expected_grads = _value_and_vjp(layer("tiles"), cotangent, rows, *weights)
  scale = np.abs(np.asarray(expected)).max()
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
  for g, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(np.asarray(e)).max())


def test_the_mosaic_kernels_operands_and_scales_give_the_fp8_numerics():
  """fp8_mosaic hands its kernels contraction-last operands with per-row and per-column scales
  (the weight transposed for the forward, 128 x 1 tiles held transposed for the weight
  gradient). With the kernels' XLA references in their place (Mosaic GPU runs only on
  Hopper), values and both gradients equal fp8_matmul over the same row tiles: widths that
  need padding, an odd chunk count, an empty expert, a group over two tiles, rows past the
  groups."""
  from moe_jax.kernels import fp8_mosaic, grouped_matmul
  rng = np.random.default_rng(7)
  rows_count, width, hidden, group_sizes = 330, 200, 300, jnp.asarray([130, 0, 60, 100])
  layout = grouped_matmul.group_layout(group_sizes, rows_count, TILE)
  rows = jnp.asarray(spread_values(rng, (rows_count, width)))
  w = jnp.asarray(rng.standard_normal((4, width, hidden)) * 0.1, jnp.float32)
  cotangent = jnp.asarray(spread_values(rng, (rows_count, hidden)))

  def product(dot):
    return lambda r, w: grouped_matmul.unpad(dot(grouped_matmul.pad(r, layout), w), layout)

  got, got_grads = _value_and_vjp(product(fp8_mosaic.padded_dot(layout, kernels=False)),
                                  cotangent, rows, w)
  expected, expected_grads = _value_and_vjp(
      product(grouped_matmul.tiled_dot(layout, TILE, fp8.fp8_matmul)), cotangent, rows, w)
  for g, e in zip((got, *got_grads), (expected, *expected_grads)):
    e = np.asarray(e)
    assert g.shape == e.shape and np.abs(e).max() > 0
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max())


def test_the_quantization_kernels_equal_the_xla_quantization_bit_for_bit():
  """fp8_quantize's Pallas kernels (in interpret mode) against kernels/fp8.py: values bit for
  bit and scales exactly, in the layouts the Mosaic kernels read (row scales chunk-major,
  column tiles transposed, weight blocks both ways), with an all-zero row and block."""
  from moe_jax.kernels import fp8_quantize
  rng = np.random.default_rng(8)
  x = jnp.asarray(spread_values(rng, (256, 384)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((2, 256, 384)), jnp.float32).at[1, :128, 128:256].set(0)
  rows, columns, weight = fp8.quantize_rows(x), fp8.quantize_rows(x.T), fp8.quantize_blocks(w)
  cases = [(fp8_quantize.rows(x, interpret=True), (rows.values, rows.scales.T)),
           (fp8_quantize.columns(x, interpret=True), (columns.values, columns.scales.T)),
           (fp8_quantize.blocks(w, interpret=True),
            (weight.values, jnp.swapaxes(weight.values, 1, 2), weight.scales))]
  for got, expected in cases:
    for g, e in zip(got, expected, strict=True):
      assert g.dtype == e.dtype and g.shape == e.shape
      np.testing.assert_array_equal(bits(g) if g.dtype == fp8.E4M3 else g,
                                    bits(e) if e.dtype == fp8.E4M3 else e)
  assert np.any(np.asarray(weight.scales) == 1.0)   # the zero block's scale is 1
