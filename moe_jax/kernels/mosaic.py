"""What the Mosaic GPU kernels (fp8_mosaic.py, ragged_mosaic.py) share: the module, TMA tile
transforms, the SM count, a whole-ref load across jax versions, and their tile widths."""

import inspect

import jax
import jax.numpy as jnp


def plgpu():
  """jax.experimental.pallas.mosaic_gpu, imported when a kernel is built (not at import)."""
  from jax.experimental.pallas import mosaic_gpu
  return mosaic_gpu


def swizzled(dtype, minor: int):
  """TMA transforms of a tile whose minor dimension holds `minor` elements of `dtype`."""
  swizzle = plgpu().find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu().TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu().SwizzleTransform(swizzle))


def num_sms() -> int:
  """The GPU's SM count (132 on an H100 or H200, the figure used where no GPU is attached)."""
  return getattr(jax.devices()[0], "core_count", 132)


def load(ref, layout):
  """plgpu.load of the whole ref (jax before 0.11 takes an index, later ones refuse it)."""
  if inspect.signature(plgpu().load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu().load(ref, (), layout=layout)
  return plgpu().load(ref, layout=layout)


def tile_width(n: int, width: int, per_block: int = 1) -> int:
  """The largest of n, n/2, ... down to 64 with `per_block` tiles of it dividing `width` (a
  multiple of 64 x per_block): a warpgroup's tile of columns, `per_block` of them a block."""
  while n > 64 and width % (per_block * n):
    n //= 2
  return n
