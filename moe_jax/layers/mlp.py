"""SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)). Used dense and as each expert."""

import jax
from flax import nnx

from moe_jax.layers.params import KeySource, param


def swiglu(x, w_gate, w_up, w_down):
  """down(silu(x @ gate) * (x @ up)) for one FFN (the experts' version: dispatch/experts.py)."""
  hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)
  return hidden @ w_down


def scaled_normal(fan_in: int):
  return nnx.initializers.normal(stddev=fan_in ** -0.5)


class SwiGLU(nnx.Module):
  """A dense SwiGLU MLP D -> F -> D with float32 parameters, computed in `dtype`."""

  def __init__(self, d_model: int, hidden: int, dtype, rngs: KeySource):
    self.w_gate = param(scaled_normal(d_model)(rngs.params(), (d_model, hidden)), "embed", "mlp")
    self.w_up = param(scaled_normal(d_model)(rngs.params(), (d_model, hidden)), "embed", "mlp")
    self.w_down = param(scaled_normal(hidden)(rngs.params(), (hidden, d_model)), "mlp", "embed")
    self.dtype = dtype

  def __call__(self, x):
    cast = lambda w: w[...].astype(self.dtype)
    return swiglu(x.astype(self.dtype), cast(self.w_gate), cast(self.w_up), cast(self.w_down))
