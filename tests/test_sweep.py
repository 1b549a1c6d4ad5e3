"""The sweep runner on a two-member sweep of the smallest config, and the shipped studies."""

import csv
import json
import math

import pytest

from moe_jax import sweep
from moe_jax.config_validation import validate_config
from tests.conftest import ROOT

TWO_MEMBERS = '''
from moe_jax.sweep import Sweep

def get_sweep(size):
  base = {"train.steps": 6, "optimizer.warmup_steps": 1, "train.log_every": 2,
          "train.eval_every": 3, "train.checkpoint_every": 3, "train.sample_tokens": 0,
          "optimizer.learning_rate": 1e-3}
  members = {"top2": {}, "top1_softmax": {"router.top_k": 1, "router.score_function": "softmax"}}
  return Sweep("pair", "configs/default.py:tiny", base, members, "Two members.")
'''


@pytest.fixture
def pair_file(tmp_path):
  path = tmp_path / "pair.py"
  path.write_text(TWO_MEMBERS)
  return path


def test_runner_runs_skips_and_tabulates_a_two_member_sweep(pair_file, tmp_path, capsys,
                                                            monkeypatch):
  monkeypatch.chdir(tmp_path)   # outside the checkout: the sweep's config is still found
  runs, results = tmp_path / "runs", tmp_path / "results"
  args = [f"{pair_file}:tiny", f"--workdir_root={runs}", f"--results={results}"]
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert "[1/2] top2: finished" in out and "[2/2] top1_softmax: finished" in out
  # A member's log is a file, not a terminal: plain lines per log step, no progress-bar frames.
  log = (runs / "pair_tiny" / "top2.log").read_text()
  assert "\r" not in log and "it/s" not in log and "step/s" not in log
  for step in (2, 4, 6):
    assert f"step {step}/6 | loss " in log and " tokens/s | " in log, log[-3000:]

  # Each member ran the config the sweep describes.
  loaded, _ = sweep.load_sweep(f"{pair_file}:tiny")
  for member in ("top2", "top1_softmax"):
    written = json.loads((runs / "pair_tiny" / member / "config.json").read_text())
    assert written == json.loads(sweep.member_config(loaded, member).to_json_best_effort())
  assert written["router"]["top_k"] == 1 and written["router"]["score_function"] == "softmax"

  rows = list(csv.DictReader(open(results / "pair_tiny" / "results.csv")))
  assert [r["member"] for r in rows] == ["top2", "top1_softmax"]
  for row in rows:
    assert row["status"] == "finished" and row["steps"] == "6"
    for key in ("validation_loss", "best_validation_loss", "validation_bits_per_byte",
                "validation_max_violation", "validation_max_violation_mean",
                "validation_max_violation_batch", "train_max_violation", "dropped_fraction"):
      assert math.isfinite(float(row[key])), key
    evaluations = [r["validation_loss"] for r in map(json.loads, open(
        runs / "pair_tiny" / row["member"] / "metrics.jsonl")) if "validation_loss" in r]
    assert len(evaluations) == 2      # steps 3 and 6
    assert float(row["best_validation_loss"]) == pytest.approx(min(evaluations), rel=1e-12)
    assert float(row["validation_loss"]) == pytest.approx(evaluations[-1], rel=1e-12)
  assert int(rows[1]["active_params"]) < int(rows[0]["active_params"])   # top-1 uses fewer
  table = (results / "pair_tiny" / "results.md").read_text()
  assert "| top1_softmax | top_k=1 score_function=softmax |" in table and "- command: `" in table
  # Where the runs ran, from each run's machine.json (8 simulated CPU devices here).
  assert json.loads((runs / "pair_tiny" / "top2" / "machine.json").read_text())["devices"] == "8 x cpu"
  assert "- machine: 8 x cpu (cpu), " in table
  for plot in ("validation_loss.png", "max_violation.png", "expert_load.png"):
    assert (results / "pair_tiny" / plot).stat().st_size > 10_000, plot

  # A second invocation skips both members.
  finished_at = (runs / "pair_tiny" / "top2" / "final_metrics.json").stat().st_mtime
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert out.count("finished earlier, skipped") == 2
  assert (runs / "pair_tiny" / "top2" / "final_metrics.json").stat().st_mtime == finished_at


def test_print_commands_gives_one_launch_line_per_member(pair_file, tmp_path, capsys,
                                                         monkeypatch):
  monkeypatch.chdir(ROOT)
  assert sweep.main([f"{pair_file}:tiny", f"--workdir_root={tmp_path}", "--print_commands"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "moe_jax.main" in l]
  assert len(lines) == 2
  assert "--config.router.top_k=1 --config.router.score_function=softmax" in lines[1]
  assert f"--workdir={tmp_path / 'pair_tiny' / 'top1_softmax'}" in lines[1]
  assert not (tmp_path / "pair_tiny" / "top2").exists()


def test_collecting_where_no_run_is_refused_and_keeps_the_earlier_tables(pair_file, tmp_path,
                                                                        capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  results = tmp_path / "results" / "pair_tiny"
  results.mkdir(parents=True)
  (results / "results.md").write_text("the tables of earlier runs")
  assert sweep.main([f"{pair_file}:tiny", "--collect_only", f"--workdir_root={tmp_path / 'none'}",
                     f"--results={tmp_path / 'results'}"]) == 2
  assert f"no run of this sweep has started under {tmp_path / 'none' / 'pair_tiny'}" in \
      capsys.readouterr().err
  assert [p.name for p in results.iterdir()] == ["results.md"]
  assert (results / "results.md").read_text() == "the tables of earlier runs"


def test_a_bad_member_stops_the_sweep_before_anything_runs(pair_file, tmp_path, capsys,
                                                           monkeypatch):
  monkeypatch.chdir(ROOT)
  pair_file.write_text(TWO_MEMBERS.replace('"router.top_k": 1', '"model.top_kk": 1'))
  assert sweep.main([f"{pair_file}:tiny", f"--workdir_root={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "member 'top1_softmax': cannot set model.top_kk=1" in err
  assert not (tmp_path / "pair_tiny" / "top2").exists()
  pair_file.write_text(TWO_MEMBERS.replace('"router.top_k": 1', '"router.top_k": 99'))
  assert sweep.main([f"{pair_file}:tiny", f"--workdir_root={tmp_path}"]) == 2
  assert "top1_softmax: invalid config:\n  - router.top_k=99 is larger" in capsys.readouterr().err


def test_output_folders_it_cannot_write_stop_the_sweep_before_anything_runs(pair_file, tmp_path,
                                                                          capsys, monkeypatch):
  """A --workdir_root or --results that is (or lies below) a file is refused in one line
  before any member runs, not with a traceback when it is first written (the results: after
  every member has run)."""
  monkeypatch.chdir(ROOT)
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  runs, results = tmp_path / "runs", tmp_path / "results"
  assert sweep.main([f"{pair_file}:tiny", f"--workdir_root={a_file}",
                     f"--results={results}"]) == 2
  assert f"--workdir_root={a_file} is not a directory" in capsys.readouterr().err
  assert sweep.main([f"{pair_file}:tiny", f"--workdir_root={runs}",
                     f"--results={a_file / 'sub'}"]) == 2
  assert f"--results={a_file / 'sub'} lies below {a_file}, which is not a directory" in \
      capsys.readouterr().err
  assert not runs.exists() and not results.exists()


@pytest.mark.parametrize("study", ["load_balancing", "granularity", "loss_logits"])
@pytest.mark.parametrize("size", ["tiny", "gpu"])
def test_shipped_studies_are_valid(study, size, monkeypatch):
  monkeypatch.chdir(ROOT)
  loaded, _ = sweep.load_sweep(f"experiments/{study}.py:{size}")
  assert len(loaded.members) >= (2 if study == "loss_logits" else 8)
  for member in loaded.members:
    validate_config(sweep.member_config(loaded, member), 8, backend="gpu" if size == "gpu" else "cpu")


def test_granularity_members_use_equal_active_parameters(monkeypatch):
  from moe_jax.model import ModelSpec, parameter_counts
  monkeypatch.chdir(ROOT)
  loaded, _ = sweep.load_sweep("experiments/granularity.py:tiny")
  counts = [parameter_counts(ModelSpec.from_config(sweep.member_config(loaded, m)))
            for m in loaded.members]
  experts = [c["active_experts"] for c in counts]
  assert max(experts) / min(experts) < 1.02, experts   # rounding of the widths only
  # Everything else but the router (which grows with E) is the same in every member.
  assert len({c["active"] - c["active_experts"] - 2 * 64 * e
              for c, e in zip(counts, [8, 8, 16, 16, 32, 32, 64, 64])}) == 1


def test_seeds_run_each_member_once_per_seed(pair_file, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  args = [f"{pair_file}:tiny", f"--workdir_root={tmp_path}", "--print_commands"]
  assert sweep.main(args + ["--seeds=0,2"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "moe_jax.main" in l]
  assert len(lines) == 4
  assert "--config.seed=2 --config.data.shuffle_seed=2" in lines[1]
  assert f"--workdir={tmp_path / 'pair_tiny' / 'top2_seed2'}" in lines[1]
  assert "--config.seed=0 --config.data.shuffle_seed=0" in lines[2]
  assert sweep.main(args + ["--seeds=0,x"]) == 2
  assert "--seeds='0,x': expected comma-separated integers" in capsys.readouterr().err
  # --members runs (here: prints) only the named members, each with every seed.
  assert sweep.main(args + ["--seeds=0,2", "--members=top1_softmax"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "moe_jax.main" in l]
  assert [l.split("--workdir=")[1] for l in lines] == [
      str(tmp_path / "pair_tiny" / f"top1_softmax_seed{s}") for s in (0, 2)]
  assert sweep.main(args + ["--members=top1,top2"]) == 2
  assert "--members='top1,top2': unknown member(s) ['top1']" in capsys.readouterr().err


def test_seed_table_gives_mean_and_sample_deviation_over_finished_runs(pair_file):
  loaded, _ = sweep.load_sweep(f"{pair_file}:tiny")
  loaded = sweep.dataclasses.replace(loaded, seeds=(0, 1, 2, 3))
  row = lambda member, seed, loss, status="finished": {
      "member": member, "seed": seed, "status": status, "overrides": "", "steps": 6,
      "active_params": 1, "active_expert_params": 1, "total_params": 1,
      "validation_loss": loss, "best_validation_loss": loss, "validation_bits_per_byte": None,
      "validation_max_violation": 0.5, "validation_max_violation_mean": None,
      "validation_max_violation_batch": None, "train_max_violation": None, "dropped_fraction": None}
  rows = [row("top2", 0, 1.0), row("top2", 1, 1.2), row("top2", 2, 1.4),
          row("top2", 3, 9.0, "partial"),   # not finished: left out
          row("top1_softmax", 0, 2.0)]
  top2, top1 = sweep.seed_summary(rows)
  assert top2["seeds"] == 3 and top2["validation_loss"] == pytest.approx((1.2, 0.2))
  assert top1["validation_loss"] == (2.0, None)   # one run: a mean, no deviation
  table = sweep.results_markdown(loaded, rows)
  assert "| top2 |  | 1.2000 ± 0.2000 | 1.2000 ± 0.2000 | - | - | 0.500 ± 0.000 |" in table
  assert "| top2 | 3 | 9.0000 |" in table   # each seed's own row follows
  assert "| top1_softmax |  | 2.0000 | 2.0000 | - |" in table
