#!/bin/bash
# Multi-host GPU training on a SLURM cluster: one moe_jax process per node, owning all of that
# node's GPUs; jax.distributed finds the other nodes from SLURM's variables.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/launch_slurm.sh \
#       configs/default.py:default,ep=all_to_all /shared/runs/ep16 [--config.x=y ...]
#
# The workdir must be on a filesystem every node sees (checkpoints are written by all
# processes together). SLURM sends SIGTERM two minutes before the time limit (--signal below);
# every process then saves a checkpoint at the next log step and exits with status 143, and
# resubmitting the same command resumes. Each node needs the package installed (make install,
# with a CUDA build of jax: pip install -U "jax[cuda13]").
#SBATCH --job-name=moe_jax
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --output=moe_jax-%j.out
set -euo pipefail
config=${1:?usage: sbatch [options] scripts/launch_slurm.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: sbatch [options] scripts/launch_slurm.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
python=${PYTHON:-.venv/bin/python}
srun --kill-on-bad-exit=1 "$python" -m moe_jax.main --distributed --config="$config" \
    --workdir="$workdir" "$@"
