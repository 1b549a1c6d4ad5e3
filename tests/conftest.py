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


# The files that take longest (about 45% of the suite), longest first. `make test`'s workers
# take whole files in collection order, so these go first and short files end the run:
# alphabetical order left one worker about a minute of work after the other had finished.
LONGEST_FILES = ("test_pipeline_training.py", "test_faults.py", "test_train.py",
                 "test_expert_parallel.py", "test_resume_settings.py", "test_fp8.py",
                 "test_multiprocess.py", "test_reliability.py", "test_mtp.py", "test_hf.py")


def pytest_collection_modifyitems(items):
  """Longest files first (`LONGEST_FILES`), the rest after them; each file's tests in order."""
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def tiny_config():
  from configs.default import get_config
  return get_config("tiny")
