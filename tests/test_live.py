"""The live Prometheus endpoint of a running training, scraped over HTTP."""

import re
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_running_training_serves_per_expert_load(tmp_path):
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "moe_jax.main", "--config=configs/default.py:tiny,steps=400",
       "--config.train.log_every=2", "--config.train.eval_every=1000",
       "--config.train.checkpoint_every=1000", f"--config.train.metrics_port={port}",
       f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  page, deadline = "", time.monotonic() + 240
  try:
    while time.monotonic() < deadline and process.poll() is None:
      try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
      except OSError:
        page = ""
      if re.search(r'^moe_expert_load\{expert="7",layer="0"\} [0-9.e-]+$', page, re.M):
        break
      time.sleep(0.5)
  finally:
    process.kill()
    _, stderr = process.communicate(timeout=60)
  loads = [float(v) for v in re.findall(r'^moe_expert_load\{expert="\d+",layer="0"\} (\S+)$', page, re.M)]
  assert len(loads) == 8, stderr[-2000:]
  assert abs(sum(loads) - 1.0) < 1e-4
  assert re.search(r"^moe_train_step \d+", page, re.M)
  assert re.search(r'^moe_max_violation\{layer="0"\} ', page, re.M)
