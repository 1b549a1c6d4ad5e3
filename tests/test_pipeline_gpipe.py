"""GPipe over a mesh axis on 8 simulated devices: outputs and gradients (parameters and inputs)
equal to running the stages one after another, on several stage x data meshes and numbers of
micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.pipeline.gpipe import gpipe

B, D = 8, 16


def _stage(params, h):
  return jnp.tanh(h @ params["w"] + params["b"])


def _one_after_another(params, x):
  for s in range(params["w"].shape[0]):
    x = _stage(jax.tree.map(lambda p: p[s], params), x)
  return x


@pytest.mark.parametrize("microbatches", [1, 4, 9])
@pytest.mark.parametrize("stages,data", [(4, 2), (2, 4), (8, 1)])
def test_gpipe_equals_the_stages_one_after_another(stages, data, microbatches):
  keys = jax.random.split(jax.random.key(stages * 10 + microbatches), 3)
  params = {"w": jax.random.normal(keys[0], (stages, D, D)) / 4,
            "b": jax.random.normal(keys[1], (stages, D))}
  x = jax.random.normal(keys[2], (microbatches, B, D))
  mesh = jax.make_mesh((stages, data), ("stage", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  loss = lambda f: (lambda p, x: jnp.sum(jnp.sin(f(p, x))))
  with jax.set_mesh(mesh):
    run = gpipe(_stage, "stage", "data")
    np.testing.assert_allclose(jax.jit(run)(params, x), _one_after_another(params, x),
                               rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(loss(run), argnums=(0, 1)))(params, x)
  expected = jax.grad(loss(_one_after_another), argnums=(0, 1))(params, x)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
