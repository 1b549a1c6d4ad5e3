"""Tests run on CPU with 8 simulated devices, so every sharded path is exercised.

Every compiled program goes to one persistent compilation cache for the session, shared by the
test workers (`make test` runs two, pytest-xdist, one test file per worker at a time) and the
commands the tests start: many tests compile the same tiny model's steps, and a cache hit runs
the same executable in a fraction of the compile time. The process that makes the cache (pytest's
main process) removes it at exit; the workers inherit its address.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests compile far more than they run: the CPU backend's optimisation passes off make the
# suite about a quarter faster, and its older (non-MLIR) fusion emitters, which compile the tiny
# model's step about 3x faster, another 28%. Neither changes a code path of this package.
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                       "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_COMPILE_FLAGS +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def tiny_config():
  from configs.default import get_config
  return get_config("tiny")


# The files that take longest, longest first (seconds of test time on the 2-core machine,
# 2026-12-01): `make test` hands whole files to its two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`), so these start first and the short files fill
# the end, and the two workers finish together. The rest keep pytest's order.
LONGEST_FIRST = ("test_pipeline_training.py",   # 239
                 "test_faults.py",              # 230
                 "test_train.py",               # 150
                 "test_expert_parallel.py",     # 130
                 "test_multiprocess.py",        # 90
                 "test_reliability.py",         # 84
                 "test_mtp.py",                 # 83
                 "test_fp8.py",                 # 70
                 "test_resume_settings.py",     # 70
                 "test_notebooks.py",           # 68
                 "test_tokenizer.py",           # 62
                 "test_pipeline_model_stages.py",   # 52
                 "test_hf.py")                  # 52


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
