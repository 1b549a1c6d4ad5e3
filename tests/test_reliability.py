"""Faults: bad numbers roll back, signals checkpoint and stop, SIGKILL mid-save loses nothing."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import parallel, steps
from moe_jax.checkpoint import Checkpointer
from moe_jax.guard import LossGuard, TrainingDiverged
from moe_jax.train import train_and_evaluate
from tests.conftest import ROOT

# ---- the guard's rules, by hand ------------------------------------------------------------


def test_guard_flags_non_finite_values():
  guard = LossGuard(spike_factor=2.0, window=3, max_rollbacks=1)
  assert guard.problem(1.0, 1.0) is None
  assert guard.problem(float("nan"), 1.0) == "non-finite loss (nan)"
  assert guard.problem(1.0, float("inf")) == "non-finite gradient norm (inf)"


def test_guard_flags_spikes_against_the_running_mean():
  guard = LossGuard(spike_factor=2.0, window=3, max_rollbacks=1)
  for loss in (9.0, 1.0, 2.0):
    assert guard.problem(100.0, 1.0) is None   # the window is not full yet: no spike judged
    guard.accept(loss)
  guard.accept(3.0)                              # window (1, 2, 3): mean 2, threshold 4
  assert guard.problem(3.99, 1.0) is None
  assert guard.problem(4.01, 1.0).startswith("loss spike: 4.0100 > 2 x 2.0000")
  assert LossGuard(0.0, 3, 1).problem(1e9, 1.0) is None   # spike_factor 0: off


def test_guard_stops_after_too_many_rollbacks_in_a_row():
  guard = LossGuard(spike_factor=2.0, window=3, max_rollbacks=2)
  guard.rolled_back("a")
  guard.rolled_back("b")
  guard.checkpointed()                 # progress: the count starts again
  guard.rolled_back("c")
  guard.rolled_back("d")
  with pytest.raises(TrainingDiverged, match="3 rollbacks in a row .* the last was for e"):
    guard.rolled_back("e")


def test_guard_window_travels_with_checkpoints():
  guard = LossGuard(spike_factor=2.0, window=2, max_rollbacks=1)
  guard.accept(1.0)
  guard.accept(2.0)
  saved = json.loads(json.dumps(guard.state()))
  guard.accept(50.0)
  guard.restore(saved)
  assert guard.problem(3.1, 1.0) is not None and guard.problem(2.9, 1.0) is None


# ---- bad numbers in a real run -------------------------------------------------------------

POISON_ID = 259   # in the vocabulary, never produced by the byte tokenizer


def _poison(monkeypatch, bad_draws, mode):
  """The training batches drawn at `bad_draws` (1-based) are replaced by POISON_ID tokens, and
  a step that sees them produces a NaN loss and NaN parameters ("nan") or a 100x loss ("spike")."""
  draws = {"count": 0}
  real_global_batch, real_train_step = parallel.global_batch, steps.train_step

  def global_batch(local, mesh, batch_axes=parallel.BATCH_AXES):
    draws["count"] += 1     # evaluation batches count too: these runs evaluate only at the end
    if draws["count"] in bad_draws:
      local = np.full_like(local, POISON_ID)
    return real_global_batch(local, mesh, batch_axes)

  def train_step(state, tokens, *run_values, **kwargs):
    new_state, metrics = real_train_step(state, tokens, *run_values, **kwargs)
    bad = jnp.all(tokens == POISON_ID)
    if mode == "nan":
      metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
      params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new_state.params)
      new_state = new_state._replace(params=params)
    else:
      metrics["loss"] = jnp.where(bad, 100.0 * metrics["loss"], metrics["loss"])
    return new_state, metrics

  monkeypatch.setattr(parallel, "global_batch", global_batch)
  monkeypatch.setattr(steps, "train_step", train_step)
  return draws


def _records(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.mark.parametrize("mode", ["nan", "spike"])
def test_bad_step_rolls_back_skips_its_batches_and_finishes(tiny_config, tmp_path, monkeypatch, mode):
  config = tiny_config
  config.train.update(steps=24, log_every=4, checkpoint_every=8, eval_every=100,
                      sample_tokens=0, spike_window=4)
  _poison(monkeypatch, bad_draws={14}, mode=mode)
  final = train_and_evaluate(config, tmp_path)

  events = [r for r in _records(tmp_path) if r.get("event") == "rollback"]
  assert len(events) == 1, events
  event = events[0]
  assert event["step"] == 14 and event["restored_step"] == 8
  assert event["reason"].startswith("non-finite loss" if mode == "nan" else "loss spike")
  assert event["skipped_batches"] in (6, 7)   # 9..14, and 15 when it ran before the check
  logged = [r["step"] for r in _records(tmp_path) if "loss" in r]
  assert logged == list(range(4, 25, 4))      # no step logged twice, none lost
  assert all(math.isfinite(r["loss"]) for r in _records(tmp_path) if "loss" in r)
  assert math.isfinite(final["validation_loss"])
  state = Checkpointer(tmp_path / "checkpoints", 2).manager.restore(24)["state"]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_too_many_rollbacks_stop_with_a_clear_message(tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.train.update(steps=30, log_every=2, checkpoint_every=6, eval_every=100,
                      sample_tokens=0, max_rollbacks=2)
  _poison(monkeypatch, bad_draws=set(range(9, 100)), mode="nan")
  with pytest.raises(TrainingDiverged, match=r"3 rollbacks in a row .*train.max_rollbacks=2"):
    train_and_evaluate(config, tmp_path)
  checkpointer = Checkpointer(tmp_path / "checkpoints", 2)
  assert checkpointer.latest_step() == 6    # the last good checkpoint is kept
  state = checkpointer.manager.restore(6)["state"]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  assert [r["restored_step"] for r in _records(tmp_path) if r.get("event") == "rollback"] == [6, 6]


# ---- preemption and crashes, on real processes ---------------------------------------------


def _command(workdir, *overrides):
  return [sys.executable, "-m", "moe_jax.main", "--config=configs/default.py:tiny",
          f"--workdir={workdir}", "--config.train.sample_tokens=0", *overrides]


def _wait_for_logged_step(workdir, process, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()
    path = workdir / "metrics.jsonl"
    if path.exists() and any(json.loads(l).get("step", 0) >= step
                             for l in path.read_text().splitlines() if l.strip()):
      return
    time.sleep(0.2)
  raise AssertionError(f"step {step} was not logged within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_next_start_resumes(tmp_path, signum):
  long_run = ("--config.train.steps=5000", "--config.train.log_every=1",
              "--config.train.eval_every=5000", "--config.train.checkpoint_every=5000")
  process = subprocess.Popen(_command(tmp_path, *long_run), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_logged_step(tmp_path, process, 3)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signum, stderr
  assert "Traceback" not in stderr
  saved = Checkpointer(tmp_path / "checkpoints", 2).latest_step()
  assert saved >= 3 and f"stopped by {signal.Signals(signum).name} after step {saved}" in stderr
  assert _records(tmp_path)[-1] == {"step": saved, "event": "preempted",
                                    "signal": signal.Signals(signum).name}

  if signum == signal.SIGINT:
    return   # the resume from a signal's checkpoint is the same path: checked once, below
  # The same run, told to end 4 steps later, resumes there.
  result = subprocess.run(_command(tmp_path, *long_run[1:], f"--config.train.steps={saved + 4}"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"Resumed from the checkpoint at step {saved}" in result.stdout + result.stderr
  steps_logged = [r["step"] for r in _records(tmp_path) if "loss" in r]
  assert steps_logged == list(range(1, saved + 5))
  assert (tmp_path / "final_metrics.json").exists()


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from configs.default import get_config
from moe_jax import checkpoint, train
config = get_config("tiny")
config.train.update(steps=24, log_every=2, checkpoint_every=8, eval_every=100, sample_tokens=0)
real_save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args):
  real_save(self, step, *args)          # orbax is now writing in the background
  if step == 16:
    print("SIGKILL while saving step 16", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
train.train_and_evaluate(config, {workdir!r})
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tiny_config, tmp_path):
  script = KILL_DURING_SAVE.format(root=str(ROOT), workdir=str(tmp_path))
  killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL and "SIGKILL while saving" in killed.stdout
  entries = sorted(os.listdir(tmp_path / "checkpoints"))
  assert "8" in entries and any(e.startswith("16.") and "tmp" in e for e in entries), entries
  before = {r["step"]: r["loss"] for r in _records(tmp_path) if "loss" in r}

  config = tiny_config
  config.train.update(steps=24, log_every=2, checkpoint_every=8, eval_every=100, sample_tokens=0)
  train_and_evaluate(config, tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "24"]   # the partial one is gone
  after = {r["step"]: r["loss"] for r in _records(tmp_path) if "loss" in r}
  assert sorted(after) == list(range(2, 25, 2))
  # Steps 9..16 ran twice, from the same checkpoint and the same data position: same losses.
  assert all(after[s] == before[s] for s in before), (before, after)
