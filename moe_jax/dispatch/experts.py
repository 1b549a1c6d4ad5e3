"""The routed experts as a value: E SwiGLU FFNs, run on a padded buffer or on ragged groups.

Shape letters: E experts, C slots per expert, D model width, F expert width, N rows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class SwiGLUExperts(NamedTuple):
  w_gate: Float[Array, "E D F"]
  w_up: Float[Array, "E D F"]
  w_down: Float[Array, "E F D"]

  @property
  def num_experts(self) -> int:
    return self.w_gate.shape[0]

  def __call__(self, buffer: Float[Array, "E C D"]) -> Float[Array, "E C D"]:
    """Expert e on buffer[e]: one batched matmul per weight."""
    hidden = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, self.w_gate))
              * jnp.einsum("ecd,edf->ecf", buffer, self.w_up))
    return jnp.einsum("ecf,efd->ecd", hidden, self.w_down)

  def ragged(self, rows: Float[Array, "N D"], group_sizes: Int[Array, "E"]) -> Float[Array, "N D"]:
    """Rows sorted by expert, group_sizes[e] of them for expert e; rows past the groups give 0."""
    dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
    return dot(jax.nn.silu(dot(rows, self.w_gate)) * dot(rows, self.w_up), self.w_down)
