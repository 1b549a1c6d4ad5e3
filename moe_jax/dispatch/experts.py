"""The routed experts as a value: E SwiGLU FFNs, run on a padded buffer or on ragged groups.

Shape letters: E experts, C slots per expert, D model width, F expert width, N rows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from moe_jax.kernels import grouped_matmul


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
    """Rows sorted by expert, group_sizes[e] of them for expert e; rows past the groups give 0.

    On GPU the grouped matmuls are the Pallas kernels of moe_jax/kernels (rows padded once
    per group to the kernels' row tile); elsewhere `jax.lax.ragged_dot`.
    """
    width, hidden = self.w_gate.shape[1], self.w_gate.shape[2]
    choice = grouped_matmul.chosen_implementation(width, hidden)
    if choice == "xla":
      dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
      return dot(jax.nn.silu(dot(rows, self.w_gate)) * dot(rows, self.w_up), self.w_down)
    if choice == "mosaic":   # ragged groups as they are
      dot = lambda a, w: grouped_matmul.mosaic_grouped_matmul(a, w, group_sizes)
      return dot(jax.nn.silu(dot(rows, self.w_gate)) * dot(rows, self.w_up), self.w_down)
    blocks = grouped_matmul.Blocks()
    if choice == "interpret":
      blocks = grouped_matmul.Blocks(m=16, n=32, k=32)   # small tiles: interpret mode is slow
    layout = grouped_matmul.group_layout(group_sizes, rows.shape[0], blocks.m)
    padded = jnp.concatenate([rows, jnp.zeros_like(rows[:1])])[layout.padded_source]
    dot = lambda a, w: grouped_matmul.gmm(
        a, w, layout.tile_group, layout.group_tile_start,
        grouped_matmul.fit_blocks(blocks, w.shape[1], w.shape[2]), choice == "interpret")
    out = dot(jax.nn.silu(dot(padded, self.w_gate)) * dot(padded, self.w_up), self.w_down)
    return jnp.concatenate([out, jnp.zeros_like(out[:1])])[layout.padded_row]
