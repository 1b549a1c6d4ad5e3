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
