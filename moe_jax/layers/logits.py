"""The output projection: 16-bit inputs, float32 logits, 16-bit backward products; and the
projection fused with the next-token cross-entropy for training.

`jnp.einsum(..., preferred_element_type=float32)` on bf16 inputs gives float32 logits, but its
gradients then arrive as float32 and both backward products run as float32 matmuls (TF32 on a
GPU: several times slower than bf16, and at a 32K vocabulary the largest matmuls of a small
model). Here the backward products take the logits' cotangent in the inputs' dtype and
accumulate in float32, as mixed-precision (autocast) training does.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _product(x, w):
  return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)


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


@jax.custom_vjp
def output_cross_entropy(x: Float[Array, "... D"], w: Float[Array, "D V"],
                         targets: Int[Array, "..."]) -> tuple[Float[Array, "..."],
                                                             Float[Array, "..."]]:
  """(-log softmax(x @ w)[target], 1.0 where the target is the top logit, else 0.0) at each
  position, in float32: `output_logits` followed by the cross-entropy, with one backward pass
  over the logits (the second output, for accuracies, has no gradient; unused, it is not
  computed). Apart, the loss's gradient is written as a float32 logits-sized array and then
  converted for the 16-bit products (two passes over [tokens, V] float32, 2 and 1.6 ms per
  step at 32K x 32K on an H200); here softmax - one-hot, times the cotangent, is one
  elementwise expression cast to x's dtype, for the compiler to write once."""
  return _cross_entropy_forward(x, w, targets)[0]


def _picked(logits, targets):
  """Each position's logit of its target."""
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _cross_entropy_forward(x, w, targets):
  logits = _product(x, w)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  nats = log_normalizer - _picked(logits, targets)
  return (nats, hits), (x, w, targets, logits, log_normalizer)


def _cross_entropy_backward(residuals, cotangents):
  x, w, targets, logits, log_normalizer = residuals
  d_nats = cotangents[0]
  # The target's -1 as the pick's own transpose (a scatter), not a one-hot comparison: over a
  # mesh the compiler then keeps the gradient split by batch, as for optax's loss (with the
  # one-hot, fsdp 8 all-gathered it and the backward's temporaries grew 2.3x on CPU).
  (at_targets,) = jax.vjp(lambda logits: _picked(logits, targets), logits)[1](d_nats)
  g = jnp.exp(logits - log_normalizer[..., None]) * d_nats[..., None] - at_targets
  return (*_input_gradients(x, w, g.astype(x.dtype)), None)


output_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)
