#!/bin/bash
# Multi-host training on a Cloud TPU VM slice: the same command on every worker; jax.distributed
# reads the slice's layout from the TPU metadata.
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd moe_jax && \
#       bash scripts/launch_tpu_vm.sh configs/default.py:default,ep=all_to_all /mnt/shared/runs/tpu"
#
# First, once per worker: git clone the repository, then
#   python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/pip install -U "jax[tpu]"
# The workdir must be a path every worker sees (an NFS share, or a bucket mounted with gcsfuse).
# A preempted slice's workers get SIGTERM; they save a checkpoint together at the next log step
# and running this again resumes. The GPU kernels of moe_jax/kernels are not used on TPU: the
# dropless dispatcher runs jax.lax.ragged_dot there.
set -euo pipefail
config=${1:?usage: launch_tpu_vm.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch_tpu_vm.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
python=${PYTHON:-.venv/bin/python}
"$python" -m moe_jax.main --distributed --config="$config" --workdir="$workdir" "$@" \
    2>&1 | tee -a "moe_jax-worker-$(hostname).log"
