"""Two processes x 4 CPU devices through jax.distributed train, checkpoint and resume exactly
like one process with 8 devices (expert parallelism across the processes, on a hybrid mesh:
the expert axis spans both processes, mesh.dcn_expert=2)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import QUICK_COMPILE_FLAGS, ROOT

ARGS = ["--config=configs/default.py:tiny,ep=all_to_all", "--config.train.log_every=1",
        "--config.train.eval_every=100", "--config.train.checkpoint_every=3",
        "--config.train.sample_tokens=8", "--config.optimizer.warmup_steps=2",
        "--config.optimizer.final_lr_fraction=1.0"]   # a schedule that train.steps leaves alone


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{QUICK_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _single(workdir, steps, *extra):
  command = [sys.executable, "-m", "moe_jax.main", *ARGS, f"--config.train.steps={steps}",
             f"--workdir={workdir}", *extra]
  result = subprocess.run(command, cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def _pair(workdir, steps, *extra):
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "moe_jax.main", *ARGS, f"--config.train.steps={steps}",
       f"--workdir={workdir}", "--distributed", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}", "--config.mesh.dcn_expert=2", *extra],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  return outputs[0]


def _losses(workdir):
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_match_one_and_resume_across_processes(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _single(one, 8, "--config.train.sample_tokens=0")
  _pair(two, 6, "--config.train.sample_tokens=0")
  output = _pair(two, 8)   # the same run extended to 8 resumes from step 6, and samples
  assert "Resumed from the checkpoint at step 6" in output
  single, pair = _losses(one), _losses(two)
  assert sorted(pair) == list(range(1, 9)) == sorted(single)
  # Cross-process all-reduces (gloo) sum in another order than one process: float32 noise only.
  np.testing.assert_allclose([pair[s] for s in range(1, 9)], [single[s] for s in range(1, 9)],
                             rtol=1e-4)
  final_one = json.loads((one / "final_metrics.json").read_text())["validation_loss"]
  final_two = json.loads((two / "final_metrics.json").read_text())["validation_loss"]
  np.testing.assert_allclose(final_two, final_one, rtol=1e-4)
  assert (two / "sample.txt").read_text()   # the chief sampled from the model both hold


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  import signal
  import time
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "moe_jax.main", *ARGS, "--config.train.steps=5000",
       "--config.train.checkpoint_every=5000", "--config.train.log_every=2",
       f"--workdir={tmp_path}", "--distributed", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  deadline = time.time() + 300
  while not (tmp_path / "metrics.jsonl").exists() or len(_losses(tmp_path)) < 2:
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)   # a scheduler may signal any one of them
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  assert [p.returncode for p in processes] == [143, 143], [o[-2000:] for o in outputs]
  stops = {line for o in outputs for line in o.splitlines() if line.startswith("stopped by SIGTERM")}
  assert len(stops) == 1, stops                # the same step in both processes
  step = int(stops.pop().split("after step ")[1].split(":")[0])
  assert step % 2 == 0 and sorted(os.listdir(tmp_path / "checkpoints")) == [str(step)]
