"""The routed experts as a value: E SwiGLU FFNs, run on a padded buffer or on ragged groups.

Shape letters: E experts, C slots per expert, D model width, F expert width, N rows.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from moe_jax.kernels import fp8, fp8_grouped_matmul, fp8_mosaic, grouped_matmul, ragged_mosaic


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_gate", "w_up", "w_down"],
                   meta_fields=["implementation", "fp8"])
@dataclasses.dataclass(frozen=True)
class SwiGLUExperts:
  """The weights, which grouped-matmul implementation ragged groups use (a name of
  `grouped_matmul.IMPLEMENTATIONS`, from `dispatch.grouped_matmul`), and whether the three
  products run in FP8 (`dispatch.fp8_experts`: kernels/fp8.py, fp8_mosaic.py,
  fp8_grouped_matmul.py). The weights may be the float32 master weights: each product casts
  them to the rows' dtype, the FP8 and Mosaic kernels inside their custom VJPs, so that the
  weight gradients come out of the kernels in float32."""

  w_gate: Float[Array, "E D F"]
  w_up: Float[Array, "E D F"]
  w_down: Float[Array, "E F D"]
  implementation: str = "auto"
  fp8: bool = False

  @property
  def num_experts(self) -> int:
    return self.w_gate.shape[0]

  def swiglu(self, x, dot, casts: bool = False, gate_and_up: bool = False, row_weights=None):
    """The products of every expert's SwiGLU through `dot(x, w)` (w one of the [E, ., .]
    weights): batched, ragged or padded-grouped, the same function. `casts`: `dot` takes the
    weights as they are and casts them itself; otherwise they are cast to x's dtype here.
    `gate_and_up`: gate and up as one product of twice the width, `dot(x, (w_gate, w_up))` with
    the pair side by side (x read once, one data gradient instead of two summed, and wider
    tiles for narrow experts). `row_weights` (one per row of x): each row's activations are
    scaled before the down projection, which is linear, so the output is the weighted one."""
    w_gate, w_up, w_down = (self if casts else self.in_dtype(x.dtype)).weights
    with jax.named_scope("experts"):
      x = checkpoint_name(x, "expert_inputs")   # names a remat policy can keep
      if gate_and_up:
        gate, up = jnp.split(dot(x, (w_gate, w_up)), 2, axis=-1)
      else:
        gate, up = dot(x, w_gate), dot(x, w_up)
      hidden = jax.nn.silu(gate) * up
      if row_weights is not None:   # in float32, so that the weights' gradient sums in float32
        hidden = (hidden.astype(jnp.float32) * row_weights[..., None]).astype(hidden.dtype)
      return checkpoint_name(dot(hidden, w_down), "expert_outputs")

  @property
  def weights(self):
    return self.w_gate, self.w_up, self.w_down

  def in_dtype(self, dtype) -> "SwiGLUExperts":
    """These experts with their weights cast to `dtype` (a no-op for weights already in it)."""
    with jax.named_scope("expert_weights"):
      return dataclasses.replace(self, **{name: getattr(self, name).astype(dtype)
                                          for name in ("w_gate", "w_up", "w_down")})

  def __call__(self, buffer: Float[Array, "E C D"]) -> Float[Array, "E C D"]:
    """Expert e on buffer[e]: one batched matmul per weight."""
    if self.fp8:
      return self.swiglu(buffer, fp8.fp8_matmul, casts=True)
    return self.swiglu(buffer, lambda x, w: jnp.einsum("eci,eio->eco", x, w))

  def ragged(self, rows: Float[Array, "N D"], group_sizes: Int[Array, "E"],
             row_weights: Float[Array, "N"] | None = None) -> Float[Array, "N D"]:
    """Rows sorted by expert, group_sizes[e] of them for expert e; rows past the groups give 0.
    With `row_weights`, row n's output is scaled by row_weights[n] (inside the SwiGLU, before
    the down projection: dispatch/dropless.py says why).

    On GPU the grouped matmuls are kernels (moe_jax/kernels): Mosaic GPU ones on ragged
    groups (Hopper: ragged_mosaic.py), or Pallas ones with rows padded once per group to the
    row tile; on CPU one batched XLA matmul over such padded row tiles; elsewhere
    `jax.lax.ragged_dot`. Gate and up run as one product of width 2F (`swiglu`'s
    `gate_and_up`; on Hopper a 384-wide expert's product takes warpgroup tiles of 128 x 64
    columns, a 768-wide one 128 x 128). FP8 experts always take padded row tiles of 128 rows
    (one scaling tile of the weight gradient each) and three products: the Mosaic FP8 kernels
    on Hopper, the FP8 Pallas kernels on other GPUs (and in interpret mode), kernels/fp8.py's
    XLA numerics elsewhere.
    """
    if self.fp8:   # widths are padded to whole scaling tiles: any width suits the kernels
      choice = grouped_matmul.chosen_implementation(fp8.TILE, fp8.TILE, self.implementation)
      layout = grouped_matmul.group_layout(group_sizes, rows.shape[0], fp8.TILE)
      if choice in ("tiles", "xla"):   # the numerics in XLA
        dot = grouped_matmul.tiled_dot(layout, fp8.TILE, fp8.fp8_matmul)
      elif choice == "mosaic":         # Hopper: e4m3 wgmma
        dot = fp8_mosaic.padded_dot(layout)
      else:                            # the Triton kernels (or them in interpret mode)
        dot = fp8_grouped_matmul.padded_fp8_dot(layout, interpret=choice == "interpret")
      return self._on_row_tiles(rows, layout, dot, casts=True, row_weights=row_weights)
    choice = grouped_matmul.chosen_implementation(self.w_gate.shape[1], self.w_gate.shape[2],
                                                  self.implementation, rows.dtype)
    if choice == "xla":
      return self.swiglu(rows, _side_by_side(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes)),
                         gate_and_up=True, row_weights=row_weights)
    if choice == "mosaic":   # zero rows appended past the groups, dropped after
      to_mosaic = grouped_matmul.to_mosaic_rows
      out = self.swiglu(to_mosaic(rows),
                        lambda x, w: ragged_mosaic.grouped_matmul(x, w, group_sizes), casts=True,
                        gate_and_up=True,
                        row_weights=None if row_weights is None else to_mosaic(row_weights))
      return out[:rows.shape[0]]
    # The rest pad each group to a row tile once, run the three products, and un-pad.
    if choice == "tiles":
      block_m = grouped_matmul.TILE_ROWS
      make_dot = lambda layout: grouped_matmul.tiled_dot(layout, block_m)
    else:
      interpret = choice == "interpret"
      # Interpret mode runs the kernels op by op: small tiles keep it quick.
      blocks = grouped_matmul.Blocks(m=16, n=32, k=32) if interpret else grouped_matmul.Blocks()
      block_m = blocks.m
      make_dot = lambda layout: grouped_matmul.padded_dot(layout, blocks, interpret)
    layout = grouped_matmul.group_layout(group_sizes, rows.shape[0], block_m)
    return self._on_row_tiles(rows, layout, _side_by_side(make_dot(layout)), gate_and_up=True,
                              row_weights=row_weights)

  def _on_row_tiles(self, rows, layout: grouped_matmul.GroupLayout, dot, casts: bool = False,
                    gate_and_up: bool = False, row_weights=None):
    """Pad each group to the layout's row tiles, run the SwiGLU's products, un-pad."""
    if row_weights is not None:
      row_weights = grouped_matmul.pad(row_weights, layout)
    return grouped_matmul.unpad(
        self.swiglu(grouped_matmul.pad(rows, layout), dot, casts, gate_and_up, row_weights),
        layout)


def _side_by_side(dot):
  """`dot(x, w)` that also takes a tuple of weights, as their concatenation along the output
  axis (the ragged Mosaic product takes the tuple itself: its weight gradients come out
  apart)."""
  return lambda x, w: dot(x, jnp.concatenate(w, axis=-1) if isinstance(w, tuple) else w)
