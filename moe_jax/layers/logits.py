"""The output projection: 16-bit inputs, float32 logits, 16-bit backward products.

`jnp.einsum(..., preferred_element_type=float32)` on bf16 inputs gives float32 logits, but its
gradients then arrive as float32 and both backward products run as float32 matmuls (TF32 on a
GPU: several times slower than bf16, and at a 32K vocabulary the largest matmuls of a small
model). Here the backward products take the logits' cotangent in the inputs' dtype and
accumulate in float32, as mixed-precision (autocast) training does.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _product(x, w):
  return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def output_logits(x: Float[Array, "... D"], w: Float[Array, "D V"]) -> Float[Array, "... V"]:
  """x @ w with float32 accumulation and output."""
  return _product(x, w)


def _forward(x, w):
  return _product(x, w), (x, w)


def _backward(residuals, dlogits):
  x, w = residuals
  g = dlogits.astype(x.dtype)
  dx = jnp.einsum("...v,dv->...d", g, w, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...d,...v->dv", x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


output_logits.defvjp(_forward, _backward)
