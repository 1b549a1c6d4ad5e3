"""Runs every expert-parallel variant the backend supports against the loop-over-experts
reference on all local devices (experts sharded over all of them) and prints the errors;
`all_gather` also with replicas of hot experts (one spare slot per rank, planned from the
routing's counts).

  python scripts/check_expert_parallel.py      # on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=8
  python scripts/check_expert_parallel.py --d_model=128 --expert_dim=128 --dtype=bfloat16
      # bf16 activations at widths the Mosaic kernels take (Hopper; float32 runs the Pallas ones)

A variant that fails to compile or run is reported, and the others still run.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import arguments
from moe_jax import parallel, routing
from moe_jax.dispatch import SwiGLUExperts, reference_dispatch
from moe_jax.dispatch.expert_parallel import VARIANTS, expert_parallel_dispatch
from moe_jax.dispatch.replicas import plan_replicas
from moe_jax.kernels.grouped_matmul import chosen_implementation


def main(batch=16, seq=32, d_model=64, expert_dim=32, experts=16, top_k=4, dtype="float32"):
  devices = jax.device_count()
  mesh = parallel.make_mesh(1, devices)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (batch, seq, d_model)).astype(dtype)
  tolerance = 1e-3 if jnp.dtype(dtype).itemsize == 4 else 2e-2   # bf16: its rounding
  weights = tuple(jax.random.normal(k, s) / 4 for k, s in zip(
      keys[1:4], [(experts, d_model, expert_dim)] * 2 + [(experts, expert_dim, d_model)]))
  hot = jnp.zeros(experts).at[:2].set(1.5)   # experts 0 and 1 hot, both on rank 0
  decision = routing.topk_route(jax.random.normal(keys[4], (batch * seq, experts)) + hot, None,
                                top_k=top_k)
  ids, gates = decision.expert_ids.reshape(batch, seq, top_k), decision.gates.reshape(batch, seq, top_k)
  reference = lambda x, w: reference_dispatch(x.reshape(-1, d_model), decision.expert_ids,
                                              decision.gates, SwiGLUExperts(*w)).output.reshape(x.shape)
  expected = reference(x.astype(jnp.float32), weights)
  expected_grads = jax.grad(lambda x, w: jnp.sum(reference(x, w) ** 2), argnums=(0, 1))(
      x.astype(jnp.float32), weights)
  variants = [v for v in VARIANTS if not (v == "ragged_all_to_all" and jax.default_backend() == "cpu")]
  plan = plan_replicas(np.bincount(np.asarray(ids).reshape(-1), minlength=experts), devices, 1)
  cases = [(v, None) for v in variants] + [("all_gather", jnp.asarray(plan.spare, jnp.int32))]
  print(f"backend {jax.default_backend()}, {devices} device(s), jax {jax.__version__}, {dtype} "
        f"activations, ragged grouped matmuls: "
        f"{chosen_implementation(d_model, expert_dim, 'auto', jnp.dtype(dtype))}")
  with jax.set_mesh(mesh):
    tokens, sharded = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    for variant, spare in cases:
      name = variant if spare is None else f"{variant} + {int(plan.copies.sum()) - experts} replicas"
      layer = lambda x, w, i, g, v=variant, s=spare: expert_parallel_dispatch(
          v, x, i, g, SwiGLUExperts(*w), experts / top_k, replica_slots=s)
      placed = (jax.device_put(x, tokens), jax.device_put(weights, sharded),
                jax.device_put(ids, tokens), jax.device_put(gates, tokens))
      try:
        y, dropped = jax.jit(layer)(*placed)
        grads = jax.jit(jax.grad(
            lambda x, w, i, g: jnp.sum(layer(x, w, i, g)[0].astype(jnp.float32) ** 2),
            argnums=(0, 1)))(*placed)
        y, grads = y.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), grads)
      except Exception as error:   # noqa: BLE001 - report it, check the other variants
        print(f"{name:>30}: FAILED: {str(error)[:1500]}")
        continue
      error = float(jnp.linalg.norm(y - expected) / jnp.linalg.norm(expected))
      grad_error = max(float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e))
                       for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)))
      ok = max(error, grad_error) < tolerance and np.isfinite(error + grad_error)
      print(f"{name:>30}: relative error {error:.2e}, gradients {grad_error:.2e}, dropped "
            f"{float(dropped):.0f}, {'OK' if ok else 'MISMATCH'}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d_model", type=arguments.whole_number(), default=64)
  parser.add_argument("--expert_dim", type=arguments.whole_number(), default=32)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the activations' dtype")
  args = parser.parse_args()
  main(d_model=args.d_model, expert_dim=args.expert_dim, dtype=args.dtype)
