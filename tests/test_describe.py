"""--print_config and --dry_run through the real command: what a run will be, nothing written."""

import subprocess
import sys

from moe_jax.describe import field_comments
from tests.conftest import ROOT


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "moe_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_comments_are_read_per_field_with_their_continuation_lines():
  source = '''
def get_config():
  c = ConfigDict()
  c.router.top_k = 2            # routed experts per token
  c.router.score_function = "sigmoid"   # "sigmoid" | "softmax"
                                        # | "expert_choice"
  # a section heading, not a continuation
  c.model.width = 8
  c.train.steps = 10  # steps # with a hash inside
  c.router.top_k = 4   # a variant's value: the first description stays
'''
  order, comments = field_comments(source)
  assert order == ["router.top_k", "router.score_function", "model.width", "train.steps"]
  assert comments == {"router.top_k": "routed experts per token",
                      "router.score_function": '"sigmoid" | "softmax" | "expert_choice"',
                      "train.steps": "steps # with a hash inside"}


def test_print_config_lists_every_field_in_file_order_with_its_comment(tmp_path):
  result = _main("--config=configs/default.py:tiny", "--config.router.top_k=3", "--print_config",
                 cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  names = [line.split(" = ")[0] for line in lines]
  assert names[:3] == ["seed", "data.source", "data.path"] and len(names) == len(set(names))
  assert "train.metrics_host" in names and "sharding.vocab" in names
  by_name = dict(zip(names, lines))
  assert [part.strip() for part in by_name["router.top_k"].split("  # ")] == [
      "router.top_k = 3", "[set on the command line] routed experts per token K"]
  assert by_name["model.d_model"].startswith("model.d_model = 64 ")   # the tiny variant's value
  assert by_name["router.score_function"].endswith('| "expert_choice" (not causal); see docs/routing.md')
  assert not list(tmp_path.iterdir())


def test_dry_run_reports_sizes_flops_mesh_and_memory_and_writes_nothing(tmp_path):
  result = _main("--config=configs/default.py:tiny", "--dry_run", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  # The tiny model by hand: embeddings 2 x 260 x 64, two attention blocks of 12,288, a dense
  # MLP of 3 x 64 x 128, a router of 64 x 8, 8 routed experts and one shared of 3 x 64 x 32, and
  # 5 norm scales of 64. Active: 2 of the 8 routed experts.
  total = 2 * 260 * 64 + 2 * 12_288 + 3 * 64 * 128 + 64 * 8 + 9 * 3 * 64 * 32 + 5 * 64
  active = total - 6 * 3 * 64 * 32
  assert (f"parameters: {total:,} total, {active:,} active per token (18,432 of them in "
          f"experts), 33,280 in the embedding and output matrices") in out
  assert "training FLOPs per token: 0.56 M; per step of 8 x 64 tokens" in out   # 557,568
  assert "mesh: data 8 x fsdp 1 x tensor 1 x expert 1" in out
  assert f"per device: parameters {total * 4 / 2**20:.1f} MiB" in out   # replicated float32
  assert "one training step as XLA compiled it: " in out
  assert "dry run: nothing was trained or written" in out
  assert not (tmp_path / "run").exists()
  bad = _main("--config=configs/default.py:tiny", "--config.router.top_k=20", "--dry_run")
  assert bad.returncode == 2 and "router.top_k=20 is larger than" in bad.stderr
