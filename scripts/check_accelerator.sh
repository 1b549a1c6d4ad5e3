#!/usr/bin/env bash
# Checks moe_jax on the machine's accelerator with whatever jax is installed there:
# prints the versions; on a GPU compares each grouped-matmul kernel with jax.lax.ragged_dot
# at row counts a decoder produces (outputs and gradients); trains the tiny config end to end,
# then a few steps of the default config in bfloat16 with capacity and with dropless dispatch
# (each ending in a sample through the cached decoder), and reports the tokens/s and losses.
#   bash scripts/check_accelerator.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs/accelerator_check}
rm -rf "$workdir"
python3 - <<'PY'
import jax, flax, optax, orbax.checkpoint as ocp, grain, ml_collections
print("jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__,
      "| devices", jax.devices())
PY
python3 - <<'PY'
import jax, jax.numpy as jnp
from moe_jax.dispatch import SwiGLUExperts
from moe_jax.kernels import grouped_matmul as gm
if jax.default_backend() == "gpu":
  kernels = ["pallas"] + (["mosaic"] if gm.hopper() else [])
  keys = jax.random.split(jax.random.key(0), 4)
  weights = [jax.random.normal(k, s, jnp.bfloat16) * 0.1 for k, s in
             zip(keys, [(4, 64, 128), (4, 64, 128), (4, 128, 64)])]
  for rows in (2, 10, 13, 130):   # decoding: tokens x top-k, any count
    x = jax.random.normal(keys[3], (rows, 64), jnp.bfloat16)
    sizes = jnp.array([rows // 4, rows // 2, 0, rows - rows // 4 - rows // 2], jnp.int32)
    def run(name):
      loss = lambda x, w: jnp.sum(SwiGLUExperts(*w, implementation=name).ragged(x, sizes)
                                  .astype(jnp.float32) ** 2)
      return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, weights)
    want = run("xla")
    for name in kernels:
      got = run(name)
      worst = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                        (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6))
                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
      print(f"grouped matmul {name} vs ragged_dot, {rows} rows: largest difference "
            f"{worst:.2e} of the largest value")
      assert worst < 3e-2, (name, rows, worst)
PY
python3 -m moe_jax.main --config=configs/default.py:tiny --workdir="$workdir/tiny" 2>&1 | tr '\r' '\n' | grep -v '^train:' || exit 1
python3 -m moe_jax.main --config=configs/default.py:default,steps=60 --config.optimizer.warmup_steps=10 \
  --config.model.compute_dtype=bfloat16 \
  --config.train.log_every=20 --config.train.eval_every=60 --config.train.sample_tokens=64 \
  --workdir="$workdir/default_bf16" 2>&1 | tr '\r' '\n' | grep -v '^train:' || exit 1
python3 -m moe_jax.main --config=configs/default.py:default,steps=60 --config.optimizer.warmup_steps=10 \
  --config.model.compute_dtype=bfloat16 \
  --config.dispatch.strategy=dropless --config.train.log_every=20 --config.train.eval_every=60 \
  --config.train.sample_tokens=64 --workdir="$workdir/default_bf16_dropless" 2>&1 \
  | tr '\r' '\n' | grep -v '^train:' || exit 1
python3 - "$workdir" <<'PY'
import json, sys
for run in ("tiny", "default_bf16", "default_bf16_dropless"):
  rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl")]
  train = [r for r in rows if "loss" in r]
  print(f"{run}: steps {train[-1]['step']}, first loss {train[0]['loss']:.3f}, last loss "
        f"{train[-1]['loss']:.3f}, tokens/s at the end {train[-1]['tokens_per_second']:.0f}, "
        f"final {json.load(open(f'{sys.argv[1]}/{run}/final_metrics.json'))}")
PY
