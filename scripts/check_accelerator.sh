#!/usr/bin/env bash
# Checks moe_jax on the machine's accelerator with whatever jax is installed there:
# prints the versions, trains the tiny config end to end, then a few steps of the default
# config in bfloat16, and reports the tokens/s and losses of each.
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
python3 -m moe_jax.main --config=configs/default.py:tiny --workdir="$workdir/tiny" 2>&1 | tr '\r' '\n' | grep -v '^train:' || exit 1
python3 -m moe_jax.main --config=configs/default.py:default,steps=60 --config.model.compute_dtype=bfloat16 \
  --config.train.log_every=20 --config.train.eval_every=60 --config.train.sample_tokens=64 \
  --workdir="$workdir/default_bf16" 2>&1 | tr '\r' '\n' | grep -v '^train:' || exit 1
python3 - "$workdir" <<'PY'
import json, sys
for run in ("tiny", "default_bf16"):
  rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl")]
  train = [r for r in rows if "loss" in r]
  print(f"{run}: steps {train[-1]['step']}, first loss {train[0]['loss']:.3f}, last loss "
        f"{train[-1]['loss']:.3f}, tokens/s at the end {train[-1]['tokens_per_second']:.0f}, "
        f"final {json.load(open(f'{sys.argv[1]}/{run}/final_metrics.json'))}")
PY
