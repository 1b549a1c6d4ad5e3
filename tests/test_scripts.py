"""The scripts refuse a mistyped argument (an output folder that cannot be one included, or, for
the importer, a directory that holds no checkpoint) in one `error:` line with status 2, through
their real command line, before anything is built or compiled."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = [
    ("bench_moe.py", "--shapes=a,z", "argument --shapes: 'z' unknown"),
    ("bench_train.py", "--profile=README.md",   # an output folder that cannot be one
     "argument --profile: README.md is a file, not a directory"),
    ("bench_expert_parallel.py", "--chunks=1,0", "argument --chunks: 0 is below 1"),
    ("bench_pipeline.py", "--schedules=1f1b,zigzag",
     "--schedules item 'zigzag': invalid config:\n  - pipeline.schedule='zigzag' is unknown"),
    ("draw_pipeline_schedule.py", "--out=docs",   # a folder: the picture would be docs.png
     "argument --out: docs does not end in one of .png, .pdf, .svg"),
    ("convert_hf.py", "--hf_dir=/nonexistent_checkpoint",
     "/nonexistent_checkpoint/config.json not found: expected a Hugging Face checkpoint"),
]


@pytest.mark.parametrize("script, argument, message", CASES, ids=[c[0] for c in CASES])
def test_a_mistyped_argument_stops_the_script_in_one_error(script, argument, message):
  result = subprocess.run([sys.executable, f"scripts/{script}", argument], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"{script}: error: {message}" in result.stderr and "Traceback" not in result.stderr, \
      result.stderr[-2000:]
  assert result.stdout == ""   # refused before the device line or any table


READERS_THAT_STOP = {   # a command whose output goes to a pipe whose reader has stopped
    "plan": ["-m", "moe_jax.plan", "--config=configs/default.py:tiny"],
    "dry run": ["-m", "moe_jax.main", "--config=configs/default.py:tiny", "--dry_run"],
    "print config": ["-m", "moe_jax.main", "--config=configs/default.py:tiny", "--print_config"],
    "sweep commands": ["-m", "moe_jax.sweep", "experiments/loss_logits.py:tiny",
                       "--print_commands", "--workdir_root={runs}"],
}


@pytest.mark.parametrize("command", READERS_THAT_STOP.values(), ids=READERS_THAT_STOP)
def test_a_report_piped_into_a_reader_that_stopped_ends_quietly(command, tmp_path):
  """`... | head -1`: status 141 (128 + SIGPIPE), as a Unix tool's, nothing on stderr, and no
  directory made (the sweep's printed commands name workdirs under `runs`)."""
  read_end, write_end = os.pipe()
  os.close(read_end)
  try:
    result = subprocess.run([sys.executable, *(a.format(runs=tmp_path / "runs") for a in command)],
                            cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
                            timeout=300)
  finally:
    os.close(write_end)
  assert (result.returncode, result.stderr) == (141, ""), result.stderr[-2000:]
  assert not (tmp_path / "runs").exists()
