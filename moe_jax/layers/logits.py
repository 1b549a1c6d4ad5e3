"""The output projection: 16-bit inputs, float32 logits, 16-bit backward products; and the
projection fused with the next-token cross-entropy for training.

`jnp.einsum(..., preferred_element_type=float32)` on bf16 inputs gives float32 logits, but its
gradients then arrive as float32 and both backward products run as float32 matmuls (TF32 on a
GPU: several times slower than bf16, and at a 32K vocabulary the largest matmuls of a small
model). Here the backward products take the logits' cotangent in the inputs' dtype and
accumulate in float32, as mixed-precision (autocast) training does.

The training loss can also keep its logits in bf16 (`model.loss_logits_dtype`): the product
still accumulates in float32 and the log-normalizer and softmax are computed in float32 from
the rounded logits (as torchtitan's and Megatron's bf16 losses are), so the loss is that of
logits rounded to bf16 (0.4% relative each), with half the residual and fewer bytes per pass.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _product(x, w, dtype=jnp.float32):
  """x @ w accumulated in float32, the result rounded to `dtype`. With 16-bit inputs the
  product itself writes `dtype` (a GPU's matmul accumulates in float32 and rounds once on
  output); a separate rounding would be fused into the readers, with float32 logits kept."""
  if x.dtype == dtype:
    return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=dtype)
  return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def output_logits(x: Float[Array, "... D"], w: Float[Array, "D V"]) -> Float[Array, "... V"]:
  """x @ w with float32 accumulation and output."""
  return _product(x, w)


def _forward(x, w):
  return _product(x, w), (x, w)


def _input_gradients(x, w, g):
  """(dx, dw) of x @ w for the logits' cotangent g in x's dtype, accumulated in float32."""
  dx = jnp.einsum("...v,dv->...d", g, w, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...d,...v->dv", x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _backward(residuals, dlogits):
  x, w = residuals
  return _input_gradients(x, w, dlogits.astype(x.dtype))


output_logits.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def output_cross_entropy(x: Float[Array, "... D"], w: Float[Array, "D V"],
                         targets: Int[Array, "..."], logits_dtype=jnp.float32
                         ) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
  """(-log softmax(x @ w)[target], 1.0 where the target is the top logit, else 0.0) at each
  position, in float32 (the logits themselves in `logits_dtype`, float32 or bfloat16):
  `output_logits` followed by the cross-entropy, with one backward pass
  over the logits (the second output, for accuracies, has no gradient; unused, it is not
  computed). Apart, the loss's gradient is written as a float32 logits-sized array and then
  converted for the 16-bit products (two passes over [tokens, V] float32, 2 and 1.6 ms per
  step at 32K x 32K on an H200); here softmax times the cotangent is written once, in x's
  dtype, and the targets' entries are then put in place (one per position: 1.6 ms)."""
  return _cross_entropy_forward(x, w, targets, logits_dtype)[0]


def _picked(logits, targets):
  """Each position's logit of its target."""
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _cross_entropy_forward(x, w, targets, logits_dtype):
  logits = _product(x, w, logits_dtype)
  log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  nats = log_normalizer - _picked(logits, targets).astype(jnp.float32)
  return (nats, hits), (x, w, targets, logits, log_normalizer)


def _put_at_targets(g, targets, values):
  """g with each position's target entry replaced by `values`: a scatter of one element per
  position, with the positions as batch dimensions (as in the target pick's transpose), which
  the compiler keeps split over a mesh and writes in place."""
  positions = tuple(range(targets.ndim))
  numbers = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(), inserted_window_dims=(targets.ndim,),
      scatter_dims_to_operand_dims=(targets.ndim,), operand_batching_dims=positions,
      scatter_indices_batching_dims=positions)
  return jax.lax.scatter(g, targets[..., None], values, numbers, unique_indices=True,
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _cross_entropy_backward(logits_dtype, residuals, cotangents):
  x, w, targets, logits, log_normalizer = residuals
  d_nats = cotangents[0]
  # softmax x cotangent everywhere, written once in x's dtype; then the targets' entries,
  # (softmax - 1) x cotangent, put in place (one element per position). A one-hot comparison
  # with an iota instead led the compiler to all-gather the gradient over the batch under
  # fsdp (temporaries 2.3x), and the pick's transpose added to the float32 expression wrote
  # and read a float32 zeros-and-cotangent array of the logits' size.
  g = jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None]) * d_nats[..., None]
  at_targets = (jnp.exp(_picked(logits, targets).astype(jnp.float32) - log_normalizer) * d_nats
                - d_nats)
  g = _put_at_targets(g.astype(x.dtype), targets, at_targets.astype(x.dtype))
  return (*_input_gradients(x, w, g), None)


output_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)
