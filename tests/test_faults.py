"""Faults and bad input through the real commands (`python -m moe_jax.main`, `moe_jax.sweep`,
`scripts/generate.py`).

Refusals: one `error:` line, exit status 2, no traceback, the workdir as it was (not created
when new). Corrupted checkpoints are refused by step, or skipped with
--skip_corrupt_checkpoints; a second run on a busy workdir is refused; a checkpoint save that
fails in the background stops the run with status 4 and the previous checkpoint intact;
sweeps stop on a signal with 128 + its number and never leave a member running.
"""

import concurrent.futures
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = "configs/default.py:tiny"


def _command(workdir, *args, config=TINY) -> list[str]:
  return [sys.executable, "-m", "moe_jax.main", f"--config={config}", f"--workdir={workdir}",
          "--config.train.sample_tokens=0", *args]


def _run(argv, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _snapshot(directory: Path):
  if not directory.exists():
    return None
  return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                          if p.is_file() else "dir")
          for p in sorted(directory.rglob("*"))}


def _assert_refused(result, *expected):
  """One `error:` line (a config's problems may add `  - ` lines), status 2, no traceback."""
  stderr = result.stderr
  assert result.returncode == 2, (result.returncode, stderr[-2000:])
  assert stderr.startswith("error: ") and stderr.count("error:") == 1, stderr[-2000:]
  assert "Traceback" not in stderr and "\\n" not in stderr, stderr[-2000:]
  assert all(line.startswith(("error: ", "  - ")) for line in stderr.strip().splitlines()), stderr
  for text in expected:
    assert text in stderr, (text, stderr)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---- bad input: config files, overrides, workdirs, values, ports ---------------------------

CONFIG_FILES = {   # file content -> what the error says
    "raises.py": ("def get_config(arg=None):\n  raise RuntimeError('boom')\n",
                  "get_config() raised RuntimeError: boom"),
    "no_get_config.py": ("CONFIG = 1\n", "defines no get_config() function"),
    "import_fails.py": ("import no_such_module_here\n",
                        "cannot be loaded (ModuleNotFoundError: No module named"),
    "syntax.py": ("def get_config(:\n", "cannot be loaded (SyntaxError: invalid syntax"),
    "returns_none.py": ("def get_config(arg=None):\n  return None\n",
                        "get_config() returned NoneType, not an ml_collections.ConfigDict"),
    "exits.py": ("import sys\nsys.exit(5)\n", "cannot be loaded (SystemExit: 5)"),
}


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], Path, list[str]]]:
  """name -> (argv, the workdir, texts the error must hold)."""
  cases = {}
  for name, (content, expected) in CONFIG_FILES.items():
    (tmp / name).write_text(content)
    cases[name] = (_command(tmp / f"run_{name}", config=str(tmp / name)), tmp / f"run_{name}",
                   [expected])
  cases["missing config file"] = (_command(tmp / "run", config=str(tmp / "nope.py")), tmp / "run",
                                  [f"no such file '{tmp / 'nope.py'}'"])
  cases["empty --config"] = (_command(tmp / "run", config=""), tmp / "run", ["--config is empty"])
  cases["unknown size"] = (_command(tmp / "run", config="configs/default.py:huge"), tmp / "run",
                           ["unknown size 'huge'; expected 'default', 'tiny' or 'gpu'"])
  cases["field that moved"] = (_command(tmp / "run", "--config.model.router=softmax"), tmp / "run",
                               ["--config.model.router: the field moved; it is now "
                                "--config.router.score_function"])
  cases["near-miss section"] = (_command(tmp / "run", "--config.routr.top_k=2"), tmp / "run",
                                ["the config has no field 'routr' (did you mean 'router'?)"])
  # Run outside the checkout: the default config is still found (the mistake is in it).
  cases["default config, elsewhere"] = (
      [sys.executable, "-m", "moe_jax.main", f"--workdir={tmp / 'run'}",
       "--config.train.step=2"], tmp / "run",
      ["--config.train.step: the config has no field 'step' (did you mean 'steps'?)"])
  cases["GPU kernels on a CPU"] = (
      _command(tmp / "run", "--config.dispatch.strategy=dropless",
               "--config.dispatch.grouped_matmul=pallas"), tmp / "run",
      ["dispatch.grouped_matmul='pallas' runs GPU kernels, but the backend is cpu"])
  cases["address not of this machine"] = (
      _command(tmp / "run", "--config.train.metrics_port=29999",
               "--config.train.metrics_host=192.0.2.1"), tmp / "run",
      ["train.metrics_port=29999: 192.0.2.1:29999 cannot be served"])
  (tmp / "a_file").write_text("not a directory")
  cases["workdir is a file"] = (_command(tmp / "a_file"), tmp / "a_file",
                                [f"--workdir={tmp / 'a_file'} is not a directory"])
  cases["workdir below a file"] = (_command(tmp / "a_file" / "run"), tmp / "a_file",
                                   [f"lies below {tmp / 'a_file'}, which is not a directory"])
  shards = tmp / "shards"
  shards.mkdir()
  (shards / "a.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
  cases["documents without the text field"] = (
      _command(tmp / "run", "--config.data.source=documents", f"--config.data.path={shards}"),
      tmp / "run", ["a.jsonl, line 1 has no field 'text' (its fields: 'body'); set "
                    "data.text_field"])
  # These two run in `tmp` (every case's working directory): nothing may appear there.
  cases["empty workdir"] = (_command(""), tmp, ["--workdir is empty"])
  cases["no workdir"] = ([a for a in _command("x") if not a.startswith("--workdir")], tmp,
                         ["--workdir is required"])
  for override, expected in [
      ("--config.optimizer.learning_rate=inf", "optimizer.learning_rate=inf must be a finite"),
      ("--config.optimizer.learning_rate=nan", "optimizer.learning_rate=nan must be a finite"),
      ("--config.dispatch.capacity_factor=inf", "dispatch.capacity_factor=inf must be a finite"),
      ("--config.data.shuffle_seed=-1", "data.shuffle_seed=-1 must be >= 0"),
      ("--config.train.steps=99999999999", "train.steps=99999999999 is out of range"),
      ("--config.router.top_k=20", "router.top_k=20 is larger than model.num_routed_experts=8"),
      ("--config.router.top_k=2.5", "--config.router.top_k=2.5: invalid literal for int()"),
      ("--config.model.nonexistent=3", "--config.model.nonexistent: the config has no field "
                                       "'nonexistent'"),
  ]:
    cases[override] = (_command(tmp / "run", override), tmp / "run", [expected])
  return cases


def test_bad_input_through_the_command_is_refused_in_one_line(tmp_path):
  cases = _bad_inputs(tmp_path)
  before = {name: _snapshot(workdir) for name, (_, workdir, _) in cases.items()}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(lambda case: _run(case[0], cwd=tmp_path),
                                       cases.values())))
  for name, (_, workdir, expected) in cases.items():
    try:
      _assert_refused(results[name], *expected)
    except AssertionError as error:
      raise AssertionError(f"case {name!r}: {error}") from None
    assert _snapshot(workdir) == before[name], f"case {name!r} changed {workdir}"


def test_busy_metrics_port_is_refused_before_the_workdir_is_made(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = _run(_command(tmp_path / "run", f"--config.train.metrics_port={port}"))
  _assert_refused(result, f"train.metrics_port={port}: 127.0.0.1:{port} cannot be served")
  assert not (tmp_path / "run").exists()


def test_symlink_loop_counts_each_file_once(tmp_path):
  """A `**` glob through a link loop: every file once, none in both splits."""
  from moe_jax import data
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  for i in range(6):
    (corpus / f"f{i}.txt").write_text(f"text {i} " * 50)
  (corpus / "sub" / "loop").symlink_to("../..")      # corpus/sub/loop -> tmp_path
  (corpus / "alias.txt").symlink_to("f0.txt")
  for path in (str(corpus / "**" / "*.txt"), str(corpus)):
    root, files = data.text_files(path)
    assert sorted(f.name for f in files) == [f"f{i}.txt" for i in range(6)], (path, files)
    train, validation = data.split_by_file(root, files, 50)
    assert not {os.path.realpath(p) for _, p in train} & {os.path.realpath(p) for _, p in validation}


# ---- checkpoints: corruption detected by step; the fallback --------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 8 steps through the command, checkpoints at steps 4 and 8."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = _run(_command(workdir, "--config.train.steps=8", "--config.train.log_every=1",
                         "--config.train.eval_every=100", "--config.train.checkpoint_every=4"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  return workdir


def _largest_array_file(checkpoint: Path) -> Path:
  return max((p for p in (checkpoint / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip_bit(path: Path) -> None:
  content = bytearray(path.read_bytes())
  content[len(content) // 2] ^= 0x10
  path.write_bytes(bytes(content))


def _edit_json(path: Path, change) -> None:
  value = json.loads(path.read_text())
  change(value)
  path.write_text(json.dumps(value))


CORRUPTIONS = {   # how the checkpoint at step 8 is damaged -> what the error says
    "bit flip in an array file": (lambda c: _flip_bit(_largest_array_file(c)),
                                  "differ from their checksums"),
    "truncated array file": (lambda c: os.truncate(_largest_array_file(c), 100), "cannot be read"),
    "deleted array file": (lambda c: _largest_array_file(c).unlink(), "cannot be read"),
    "wrong data position": (lambda c: _edit_json(c / "data" / "metadata",
                                                 lambda d: d.update(next_index=5)),
                            "its data item differs from its checksum"),
    "wrong loss window": (lambda c: _edit_json(c / "loop" / "metadata",
                                               lambda d: d["guard"]["recent"].append(1.0)),
                          "its loop item differs from its checksum"),
    "garbled config item": (lambda c: (c / "config" / "metadata").write_text("{not json"),
                            "cannot be read (JSONDecodeError"),
    "missing config item": (lambda c: shutil.rmtree(c / "config"), "cannot be read"),
    "missing checksums": (lambda c: shutil.rmtree(c / "integrity"), "cannot be read"),
}


def test_corrupted_checkpoints_are_refused_by_step(trained, tmp_path):
  workdirs = {}
  for i, (name, (damage, _)) in enumerate(CORRUPTIONS.items()):
    workdirs[name] = tmp_path / f"case{i}"
    shutil.copytree(trained, workdirs[name])
    damage(workdirs[name] / "checkpoints" / "8")
  before = {name: _snapshot(w) for name, w in workdirs.items()}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(workdirs, pool.map(
        lambda w: _run(_command(w, "--config.train.steps=12")), workdirs.values())))
  for name, (_, expected) in CORRUPTIONS.items():
    try:
      _assert_refused(results[name], "the checkpoint at step 8", "is corrupt", expected,
                      "--skip_corrupt_checkpoints")
    except AssertionError as error:
      raise AssertionError(f"case {name!r}: {error}") from None
    assert _snapshot(workdirs[name]) == before[name], f"case {name!r} changed the workdir"


def test_skip_corrupt_checkpoints_resumes_from_the_newest_that_verifies(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  _flip_bit(_largest_array_file(workdir / "checkpoints" / "8"))
  original = {r["step"]: r["loss"] for r in _records(trained) if "loss" in r}
  result = _run(_command(workdir, "--config.train.steps=8", "--config.train.log_every=1",
                         "--config.train.eval_every=100", "--config.train.checkpoint_every=4",
                         "--skip_corrupt_checkpoints"))
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert "warning: the checkpoint at step 8" in output and "is corrupt" in output
  assert "Resumed from the checkpoint at step 4" in output
  assert (workdir / "corrupt_checkpoints" / "8" / "state").is_dir()   # kept for inspection
  retrained = {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}
  assert retrained == original    # steps 5-8 again from step 4's checkpoint: the same losses


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(trained, tmp_path):
  """A run killed before it saved anything starts again from step 0: the killed attempt's
  records go, so every step appears once, with the losses of the new attempt."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints")
  (workdir / "final_metrics.json").unlink()
  original = [(r["step"], r["loss"]) for r in _records(trained) if "loss" in r]
  result = _run(_command(workdir, "--config.train.steps=8", "--config.train.log_every=1",
                         "--config.train.eval_every=100", "--config.train.checkpoint_every=4"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert [(r["step"], r["loss"]) for r in _records(workdir) if "loss" in r] == original


GENERATE_CASES = {   # scripts/generate.py arguments -> the one error line (None: it generates)
    ("--step=5",): "keeps no checkpoint at step 5; it keeps steps 4, 8",
    ("--max_new_tokens=0",): "argument --max_new_tokens: 0 is below 1",
    ("--prompt_ids=1,x",): "argument --prompt_ids: 'x' is not an integer",
    ("--prompt_ids=1,999",): "a prompt id is outside the vocabulary of 260",
    ("--speculative",): "--speculative drafts with the model's MTP modules, and this run has none",
    ("--step=4", "--prompt=def ", "--max_new_tokens=62"): None,   # 67 positions, 3 past 64
}


def test_generate_refuses_bad_input_in_one_line_and_generates_from_a_run(trained, tmp_path):
  """scripts/generate.py: a workdir without a run, a step the run does not keep or a bad
  argument stops it with one `generate.py: error:` line and status 2; a good call prints the
  run's step and the continuation, and notes the positions past the run's trained windows."""
  script = [sys.executable, "scripts/generate.py"]
  cases = {(f"--workdir={tmp_path}",): f"{tmp_path} holds no run (no config.json)",
           **{(f"--workdir={trained}", *args): line for args, line in GENERATE_CASES.items()}}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(lambda args: _run(script + list(args)), cases)))
  for args, expected in cases.items():
    result = results[args]
    if expected is None:
      assert result.returncode == 0, result.stderr[-3000:]
      assert result.stdout.startswith(f"run {trained} at step 4; prompt of 5 tokens\n")
      assert result.stdout.strip().endswith("tokens/s")
      assert ("generate.py: note: the run trained on windows of 64 tokens; the last 3 of "
              "these 67 positions lie beyond any it saw") in result.stderr, result.stderr[-3000:]
      continue
    assert result.returncode == 2, (args, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, (args, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("generate.py: error: ") and expected in last, (args, last)


def test_a_second_run_reuses_the_compiled_programs_the_first_kept(tmp_path):
  """train.compilation_cache_dir keeps every compiled program: a second run of the same config
  in a new workdir finds all of them there and adds nothing (the suite's own cache variable
  is removed, so the config's directory is the one used)."""
  cache = tmp_path / "cache"
  environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  entries = []
  for run in ("first", "second"):
    result = subprocess.run(
        _command(tmp_path / run, "--config.train.steps=4", "--config.train.log_every=2",
                 "--config.train.eval_every=4", "--config.train.eval_batches=1",
                 "--config.optimizer.warmup_steps=1",
                 f"--config.train.compilation_cache_dir={cache}"),
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    entries.append(sorted(p.name for p in cache.iterdir()))
  assert len(entries[0]) >= 2            # the training step and the evaluation, at least
  assert entries[1] == entries[0]


# ---- one run per workdir ---------------------------------------------------------------------


def _wait_for_step(workdir: Path, process, step: int, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()
    path = workdir / "metrics.jsonl"
    if path.exists() and any(r.get("step", 0) >= step for r in map(
        json.loads, filter(str.strip, path.read_text().splitlines()))):
      return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not logged in {timeout} s")


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(_command(workdir, "--config.train.steps=5000",
                                    "--config.train.log_every=1"),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(workdir, first, 2)
    second = _run(_command(workdir, "--config.train.steps=5000", "--config.train.log_every=1"))
    _assert_refused(second, f"--workdir={workdir} is in use by another run (process {first.pid})")
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == list(range(1, len(steps) + 1))   # each step once: no second writer


# ---- a checkpoint save that fails in the background ----------------------------------------


def test_failed_background_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path):
  """The workdir's files stop growing past 100 kB (RLIMIT_FSIZE, set on the running process
  once its first checkpoint is complete), as on a full disk: the next save fails in orbax's
  background thread."""
  workdir = tmp_path / "run"
  every = 40
  args = ("--config.train.steps=3000", "--config.train.log_every=3000",
          "--config.train.eval_every=3000", f"--config.train.checkpoint_every={every}")
  process = subprocess.Popen(_command(workdir, *args), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / str(every)).is_dir():
      assert process.poll() is None and time.time() < deadline, process.communicate()
      time.sleep(0.05)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
    _, stderr = process.communicate(timeout=240)
  finally:
    process.kill()
  assert process.returncode == 4, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  failed = int(lines[0].split("checkpoint at step ")[1].split()[0])
  stopped = int(lines[0].split("training stopped after step ")[1].split(":")[0])
  assert failed < stopped < failed + every   # at a step boundary soon after, not at the next save
  kept = failed - every
  assert f"the checkpoint at step {kept} is the newest complete one and is intact" in lines[0]
  complete = sorted(int(e) for e in os.listdir(workdir / "checkpoints") if e.isdigit())
  assert complete[-1] == kept

  # The kept checkpoint verifies (its checksums are recomputed on restore); the partial one
  # is not among the complete checkpoints.
  from moe_jax import analysis
  assert analysis.load_run(workdir, kept).step == kept
  assert analysis.checkpoint_steps(workdir) == [kept]


# ---- sweeps ------------------------------------------------------------------------------------

SWEEP = '''
from moe_jax.sweep import Sweep

def get_sweep(size):
  base = {{"train.steps": {steps}, "train.log_every": 1, "train.eval_every": 100000,
          "train.checkpoint_every": 100000, "train.sample_tokens": 0}}
  return Sweep("pair", "configs/default.py:tiny", base, {{"a": {{}}, "b": {{"router.top_k": 1}}}})
'''


def _start_sweep(tmp_path, steps):
  (tmp_path / "pair.py").write_text(SWEEP.format(steps=steps))
  return subprocess.Popen([sys.executable, "-m", "moe_jax.sweep", f"{tmp_path / 'pair.py'}:tiny",
                           f"--workdir_root={tmp_path / 'runs'}", f"--results={tmp_path / 'results'}"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alive(pid: int) -> bool:
  """Whether process `pid` runs (a zombie waiting for a parent to reap it does not)."""
  status = Path(f"/proc/{pid}/status")
  try:
    return "\nState:\tZ" not in status.read_text()
  except OSError:
    return False


def _children(pid: int) -> list[int]:
  path = Path(f"/proc/{pid}/task/{pid}/children")
  return [int(p) for p in path.read_text().split()] if path.exists() else []


def _member_started(runner, tmp_path, member="a", timeout=240) -> int:
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert runner.poll() is None, runner.communicate()
    children = _children(runner.pid)
    if children:
      return children[0]
    time.sleep(0.02)
  raise AssertionError("no member started")


def test_sigterm_stops_the_sweep_with_its_status(tmp_path):
  """A SIGTERM to the runner while its member is still starting stops the member at once and
  the sweep: exit 143, no second member. (A member that trains checkpoints first: see
  test_killing_the_runner_stops_its_member_with_a_checkpoint.)"""
  runner = _start_sweep(tmp_path, steps=5000)
  try:
    member = _member_started(runner, tmp_path)
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=120)
  finally:
    runner.kill()
  assert runner.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "sweep stopped by SIGTERM" in err and "Traceback" not in err
  assert not _alive(member)
  assert not (tmp_path / "runs" / "pair_tiny" / "b").exists()


TGKILL = {"x86_64": 234, "aarch64": 131}   # Linux's syscall number: a signal to one thread


def test_a_sigterm_taken_by_another_thread_of_the_runner_still_stops_the_sweep(tmp_path):
  """The kernel may hand a process's SIGTERM to any of its threads (the runner has jax's thread
  pools): delivered to one that is not the main thread, the runner still passes it on while
  its member trains, and the sweep stops with 143. (Waiting on the member in one blocking
  call, the runner never ran its handler: the member trained on.)"""
  import ctypes
  import platform
  runner = _start_sweep(tmp_path, steps=5000)
  try:
    member = _member_started(runner, tmp_path)
    _wait_for_step(tmp_path / "runs" / "pair_tiny" / "a", runner, 1)
    threads = [int(t) for t in os.listdir(f"/proc/{runner.pid}/task") if int(t) != runner.pid]
    assert threads, "the runner has threads besides the main one"
    assert ctypes.CDLL(None, use_errno=True).syscall(
        TGKILL[platform.machine()], runner.pid, threads[-1], signal.SIGTERM) == 0
    out, err = runner.communicate(timeout=120)
  finally:
    runner.kill()
  assert runner.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "sweep stopped by SIGTERM" in err and not _alive(member)


def test_killing_the_runner_stops_its_member_with_a_checkpoint(tmp_path):
  runner = _start_sweep(tmp_path, steps=5000)
  workdir = tmp_path / "runs" / "pair_tiny" / "a"
  try:
    member = _member_started(runner, tmp_path)
    _wait_for_step(workdir, runner, 2)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    deadline = time.time() + 120
    while _alive(member) and time.time() < deadline:
      time.sleep(0.2)
  finally:
    runner.kill()
  assert not _alive(member), "the member outlived its runner"
  event = _records(workdir)[-1]
  assert event["event"] == "preempted" and event["signal"] == "SIGTERM"
  assert (workdir / "checkpoints" / str(event["step"])).is_dir()


def test_a_metrics_line_cut_by_a_crash_is_dropped_at_the_resume(tmp_path):
  from moe_jax.metrics import MetricWriter, read_jsonl
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  (tmp_path / "routing.jsonl").write_text('{"step": 1, "load": []}\n')
  writer = MetricWriter(tmp_path)
  writer.rewind(1)
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0},
                                                     {"step": 2, "loss": 1.5}]
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
