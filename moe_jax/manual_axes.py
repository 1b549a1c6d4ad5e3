"""Values inside `jax.shard_map` typed by the manual mesh axes along which they differ.

With `check_vma` (the default) shard_map types every value by the manual axes along which it
may differ from device to device, and checks that a loop's carry keeps its type and a custom
VJP's gradients carry their inputs' types. Kernels' outputs carry no type of their own; these
helpers give values the type they need.
"""

import jax


def typed_like(value, *references):
  """`value` typed as differing along every manual mesh axis one of `references` differs along.
  Inside a `jax.shard_map` a kernel's output carries no such type: it differs wherever its
  inputs do."""
  missing = tuple(frozenset().union(*map(varying_axes, references)) - varying_axes(value))
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def gradient_like(gradient, primal):
  """A custom VJP's `gradient` (typed as differing wherever its inputs do) for `primal`, typed
  as `primal` is: summed over the manual mesh axes along which it differs and `primal` does
  not (the transpose of the primal's implicit broadcast there: expert weights, one copy per
  `data` rank, used by tokens that differ along `data`), then given `primal`'s other axes."""
  extra = tuple(varying_axes(gradient) - varying_axes(primal))
  return typed_like(jax.lax.psum(gradient, extra) if extra else gradient, primal)


def kernel_output(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A Pallas kernel's `out_shape`: inside a `jax.shard_map` its output must say along which
  manual axes it differs; it differs as `like` (its row operand) does (`typed_like` the others
  after the call)."""
  manual = getattr(jax.typeof(like), "mat", None)
  if manual is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def varying_axes(x) -> frozenset:
  """The manual mesh axes along which x's type says it differs (jax keeps them in `mat`, or
  in `vma` in some versions)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying_along(axes: tuple[str, ...]):
  """x -> x typed as differing along every one of `axes`: shard_map checks that a loop's carry
  keeps its type, and a pipeline's carries come to differ along the stage axis (and the data
  axes). Adds a zero that differs along each axis, so it serves values that already differ
  along some of them too (`jax.lax.pcast` refuses those)."""
  zero = sum(jax.lax.axis_index(a) for a in axes) * 0
  return lambda x: x + zero.astype(x.dtype)
