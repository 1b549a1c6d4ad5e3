"""Runs every expert-parallel variant the backend supports against the loop-over-experts
reference on all local devices (experts sharded over all of them) and prints the errors;
`all_gather` also with replicas of hot experts (one spare slot per rank, planned from the
routing's counts); `ragged_all_to_all` also capped (`dispatch.ragged_capacity_factor` 1),
against `all_to_all` at the same capacity: the same assignments drop.

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
  spare = jnp.asarray(plan.spare, jnp.int32)
  # (name, variant, replica slots, capacity factor, what it must equal); the capped ragged
  # exchange drops what all_to_all drops at the same capacity (the hot experts overflow).
  cases = [(v, v, None, 0.0 if v == "ragged_all_to_all" else experts / top_k, "reference")
           for v in variants]
  cases.append((f"all_gather + {int(plan.copies.sum()) - experts} replicas", "all_gather", spare,
                experts / top_k, "reference"))
  if "ragged_all_to_all" in variants:
    cases.append(("ragged_all_to_all, capacity 1", "ragged_all_to_all", None, 1.0,
                  "all_to_all, capacity 1"))
  print(f"backend {jax.default_backend()}, {devices} device(s), jax {jax.__version__}, {dtype} "
        f"activations, ragged grouped matmuls: "
        f"{chosen_implementation(d_model, expert_dim, 'auto', jnp.dtype(dtype))}")
  with jax.set_mesh(mesh):
    tokens, sharded = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    placed = (jax.device_put(x, tokens), jax.device_put(weights, sharded),
              jax.device_put(ids, tokens), jax.device_put(gates, tokens))

    def run(variant, spare_slots, factor):
      """(output, dropped, gradients of tokens and weights), in float32."""
      layer = lambda x, w, i, g: expert_parallel_dispatch(
          variant, x, i, g, SwiGLUExperts(*w), factor, replica_slots=spare_slots)
      y, dropped = jax.jit(layer)(*placed)
      grads = jax.jit(jax.grad(
          lambda x, w, i, g: jnp.sum(layer(x, w, i, g)[0].astype(jnp.float32) ** 2),
          argnums=(0, 1)))(*placed)
      return (y.astype(jnp.float32), float(dropped),
              jax.tree.map(lambda a: a.astype(jnp.float32), grads))

    for name, variant, spare_slots, factor, target in cases:
      try:
        y, dropped, grads = run(variant, spare_slots, factor)
        want, want_dropped, want_grads = ((expected, 0.0, expected_grads) if target == "reference"
                                          else run("all_to_all", None, factor))
      except Exception as error:   # noqa: BLE001 - report it, check the other variants
        print(f"{name:>30}: FAILED: {str(error)[:1500]}")
        continue
      error = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
      grad_error = max(float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e))
                       for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
      ok = (max(error, grad_error) < tolerance and np.isfinite(error + grad_error)
            and dropped == want_dropped)
      print(f"{name:>30}: against the {target}: relative error {error:.2e}, gradients "
            f"{grad_error:.2e}, dropped {dropped:.0f} ({want_dropped:.0f}), "
            f"{'OK' if ok else 'MISMATCH'}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d_model", type=arguments.whole_number(), default=64)
  parser.add_argument("--expert_dim", type=arguments.whole_number(), default=32)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the activations' dtype")
  args = parser.parse_args()
  main(d_model=args.d_model, expert_dim=args.expert_dim, dtype=args.dtype)
