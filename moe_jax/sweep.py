"""Ablation sweeps: a base config plus named overrides, run one after another, then tabulated.

A sweep file (experiments/*.py) defines `get_sweep(size) -> Sweep`. Then

  python -m moe_jax.sweep experiments/load_balancing.py:tiny            # run every member here
  python -m moe_jax.sweep experiments/load_balancing.py:gpu --print_commands   # for a cluster
  python -m moe_jax.sweep experiments/load_balancing.py:tiny --collect_only    # tables only
  python -m moe_jax.sweep experiments/load_balancing.py:gpu --members=none,switch_1e-2  # some

With several seeds (`Sweep.seeds`, or `--seeds=0,1,2`) each member runs once per seed
(`seed` and `data.shuffle_seed` set to it) and the table gives each measure's mean ± sample
standard deviation over the seeds, then every run.

Each run is an ordinary `moe_jax.main` run in its own workdir (<workdir_root>/<sweep>_<size>/
<member>, or <member>_seed<N> with several seeds), so a run that finished
(final_metrics.json) is skipped and one that stopped resumes from its checkpoint. The results directory receives results.csv, results.md, the
curves and validation expert counts behind the plots (curves.json, expert_loads.json), and
three plots (validation loss, training MaxVio, per-layer validation expert load).
"""

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections

from moe_jax import metrics
from moe_jax.closed_pipe import quiet_exit_status
from moe_jax.paths import load_module, locate, not_found
from moe_jax.preemption import PARENT_PID_VARIABLE


class SweepError(ValueError):
  """The sweep file or one of its members cannot run; the message names it."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str                          # names the workdirs and the results directory
  config: str                        # the --config argument: "configs/default.py:tiny"
  base: dict[str, object]            # overrides every member gets ("router.top_k": 2)
  members: dict[str, dict[str, object]]   # member name -> its own overrides
  question: str = ""                 # what the sweep is for, printed above its table
  seeds: tuple[int, ...] = (0,)      # each member runs once per seed (seed and data order)
  named_seeds: bool = False          # runs carry their seed even for seeds (0,) (--seeds=0)

  @property
  def seeded(self) -> bool:
    return self.named_seeds or self.seeds != (0,)

  def overrides(self, member: str, seed: int | None = None) -> dict[str, object]:
    """The member's overrides; in a seeded sweep, also its seed's."""
    seeded = {"seed": seed, "data.shuffle_seed": seed} if self.seeded and seed is not None else {}
    return {**self.base, **self.members[member], **seeded}

  def runs(self) -> list[tuple[str, str, int]]:
    """(run name, member, seed) of every run: the member's name, with its seed in a seeded
    sweep (several seeds, or any given by --seeds: "aux_free_seed1")."""
    if not self.seeded:
      return [(member, member, 0) for member in self.members]
    return [(f"{member}_seed{seed}", member, seed) for member in self.members
            for seed in self.seeds]


def load_sweep(spec: str) -> tuple[Sweep, str]:
  """"experiments/x.py:size" -> (the file's get_sweep(size), size)."""
  path, _, size = spec.partition(":")
  found = locate(path)
  if found is None:
    raise SweepError(not_found("sweep file", path))
  path = str(found)
  root = str(Path(path).resolve().parent.parent)   # sweep files import experiments.sizes
  if root not in sys.path:
    sys.path.insert(0, root)
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep(size)")
  try:
    return module.get_sweep(size), size
  except (KeyError, ValueError) as error:   # a KeyError's str() quotes its message
    raise SweepError(f"{path}: size {size!r}: {error.args[0] if error.args else error}") from None


def member_config(sweep: Sweep, member: str, seed: int | None = None) -> ml_collections.ConfigDict:
  """The member's full config (for one seed), built as the command line would build it."""
  path, _, arg = sweep.config.partition(":")
  found = locate(path)
  if found is None:
    raise SweepError(not_found(f"the sweep's config {sweep.config!r}", path))
  config = load_module(str(found)).get_config(arg)
  for dotted, value in sweep.overrides(member, seed).items():
    *sections, name = dotted.split(".")
    node = config
    try:
      for section in sections:
        node = node[section]
      if name not in node:
        raise KeyError(name)
      node[name] = value
    except (KeyError, TypeError) as error:
      raise SweepError(f"member {member!r}: cannot set {dotted}={value!r} "
                       f"({type(error).__name__}: {error})") from None
  return config


def _flag_value(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def command(sweep: Sweep, member: str, workdir: Path, python: str = sys.executable,
            seed: int | None = None) -> list[str]:
  """The `moe_jax.main` command line of one member (and seed)."""
  return ([python, "-m", "moe_jax.main", f"--config={sweep.config}"]
          + [f"--config.{k}={_flag_value(v)}" for k, v in sweep.overrides(member, seed).items()]
          + [f"--workdir={workdir}"])


def is_finished(workdir: Path) -> bool:
  return (workdir / "final_metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Running


def run_member(argv: list[str], log_path: Path) -> tuple[int, int | None]:
  """Runs one member in its own session, its output in `log_path`; a SIGINT/SIGTERM to the
  runner is passed on once, so the member checkpoints and stops, and the member gets SIGTERM
  if the runner dies. Returns (the member's exit status, the signal the runner received)."""
  with open(log_path, "a") as log:
    received, process = [], None

    def forward(signum, frame):
      if not received:
        received.append(signum)
        if process is not None:
          process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 env={**os.environ, PARENT_PID_VARIABLE: str(os.getpid())})
      if received:   # a signal came while the member was being started
        process.send_signal(received[0])
      return _wait_responsively(process), (received[0] if received else None)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def _wait_responsively(process: subprocess.Popen) -> int:
  """The process's exit status, waited for in short slices. The kernel may deliver a signal
  to any thread of this process (jax's thread pools among them); Python then runs the handler
  only when the main thread next runs Python code, which a plain `wait()` (one blocking
  `waitpid`, not interrupted when another thread took the signal) would put off until the
  member exits: the SIGTERM would never be passed on."""
  while True:
    try:
      return process.wait(timeout=0.25)
    except subprocess.TimeoutExpired:
      continue


def _status(code: int) -> str:
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return {0: "finished", 3: "diverged"}.get(code, f"failed (exit status {code})")


class SweepStopped(Exception):
  """A SIGINT/SIGTERM stopped the sweep; `exit_code` is 128 + its number."""

  def __init__(self, signum: int, member: str):
    super().__init__(f"sweep stopped by {signal.Signals(signum).name} during {member!r}; run the "
                     f"same command again to resume it")
    self.exit_code = 128 + signum


def run_sweep(sweep: Sweep, size: str, root: Path, print_commands: bool = False) -> dict[str, str]:
  """Runs (or prints) every unfinished member; returns {member: status}. A SIGINT/SIGTERM
  stops the member that runs (it checkpoints) and raises SweepStopped."""
  import jax
  from moe_jax.config_validation import ConfigError, validate_config
  problems = []
  for member in sweep.members:   # every member is checked before any runs
    try:
      validate_config(member_config(sweep, member), jax.device_count())
    except (SweepError, ConfigError) as error:
      problems.append(f"{member}: {error}")
  if problems and not print_commands:
    raise SweepError("sweep members that cannot run here:\n" + "\n".join(problems))

  statuses, runs = {}, sweep.runs()
  if not print_commands:
    root.mkdir(parents=True, exist_ok=True)
  for i, (name, member, seed) in enumerate(runs, 1):
    workdir = root / name
    if is_finished(workdir):
      statuses[name] = "finished"
      print(f"[{i}/{len(runs)}] {name}: finished earlier, skipped", flush=True)
      continue
    argv = command(sweep, member, workdir, seed=seed)
    if print_commands:
      print(" ".join(argv))
      continue
    print(f"[{i}/{len(runs)}] {name}: running (output in {root / (name + '.log')})", flush=True)
    started = time.time()
    code, received = run_member(argv, root / f"{name}.log")
    statuses[name] = _status(code)
    print(f"[{i}/{len(runs)}] {name}: {statuses[name]} in {time.time() - started:.0f} s",
          flush=True)
    if received or code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
      raise SweepStopped(received or code - 128, name)
  return statuses


# ---------------------------------------------------------------------------------------------
# Collecting


def member_result(sweep: Sweep, member: str, workdir: Path, seed: int = 0) -> dict:
  """One run's table row: final and best validation numbers and training routing
  statistics."""
  from moe_jax.model import ModelSpec, parameter_counts
  records = metrics.read_jsonl(workdir / "metrics.jsonl")
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "validation_loss" in r]
  counts = parameter_counts(ModelSpec.from_config(member_config(sweep, member)))
  mean = lambda key: (sum(r[key] for r in train) / len(train)) if train and key in train[0] else None
  row = {
      "member": member, "seed": seed,
      "status": "finished" if is_finished(workdir) else ("partial" if records else "not run"),
      "overrides": " ".join(f"{k.split('.')[-1]}={_flag_value(v)}"
                            for k, v in sweep.members[member].items()),
      "steps": train[-1]["step"] if train else 0,
      "active_params": counts["active"], "active_expert_params": counts["active_experts"],
      "total_params": counts["total"],
      "validation_loss": evals[-1]["validation_loss"] if evals else None,
      "best_validation_loss": min(r["validation_loss"] for r in evals) if evals else None,
      "validation_bits_per_byte": evals[-1].get("validation_bits_per_byte") if evals else None,
      "validation_max_violation": evals[-1].get("validation_max_violation") if evals else None,
      "validation_max_violation_mean": (evals[-1].get("validation_max_violation_mean")
                                        if evals else None),
      "validation_max_violation_batch": (evals[-1].get("validation_max_violation_batch")
                                         if evals else None),
      "train_max_violation": mean("max_violation"),
      "dropped_fraction": mean("dropped_fraction"),
      "rollbacks": sum(1 for r in records if r.get("event") == "rollback"),
  }
  return row


COLUMNS = [  # (key, header, format)
    ("member", "member", "{}"), ("overrides", "overrides", "{}"),
    ("validation_loss", "val loss", "{:.4f}"), ("best_validation_loss", "best val loss", "{:.4f}"),
    ("validation_bits_per_byte", "val bits/byte", "{:.4f}"),
    ("validation_max_violation_mean", "val MaxVio (mean of layers)", "{:.3f}"),
    ("validation_max_violation", "val MaxVio (worst layer)", "{:.3f}"),
    ("validation_max_violation_batch", "val MaxVio/batch", "{:.3f}"),
    ("train_max_violation", "train MaxVio/batch (run mean)", "{:.3f}"),
    ("dropped_fraction", "dropped", "{:.4f}"), ("active_params", "active params", "{:,}"),
    ("active_expert_params", "active expert params", "{:,}"),
    ("total_params", "total params", "{:,}"), ("steps", "steps", "{}"), ("status", "status", "{}"),
]


SPREAD_KEYS = ("validation_loss", "best_validation_loss", "validation_bits_per_byte",
               "validation_max_violation_mean", "validation_max_violation",
               "validation_max_violation_batch", "train_max_violation", "dropped_fraction")


def seed_summary(rows: list[dict]) -> list[dict]:
  """One row per member: for each measure of SPREAD_KEYS, (mean, sample standard deviation)
  over the member's finished runs (no deviation for one run), and how many runs that is."""
  import statistics
  summary = []
  for member in dict.fromkeys(r["member"] for r in rows):
    runs = [r for r in rows if r["member"] == member]
    finished = [r for r in runs if r["status"] == "finished"]
    row = {k: runs[0][k] for k in ("member", "overrides", "active_params",
                                   "active_expert_params", "total_params", "steps")}
    row.update(seeds=len(finished), status=f"{len(finished)} of {len(runs)} finished")
    for key in SPREAD_KEYS:
      values = [r[key] for r in finished if r[key] is not None]
      row[key] = ((statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
                  if values else None)
    summary.append(row)
  return summary


def markdown_table(rows: list[dict], columns=None) -> str:
  """Rows as a markdown table; a (mean, std) value shows as "mean ± std" (the mean alone
  when there is no std: one run)."""
  columns = columns or COLUMNS

  def cell(row, key, fmt):
    value = row.get(key)
    if value is None:
      return "-"
    if isinstance(value, tuple):
      mean, std = value
      return fmt.format(mean) + ("" if std is None else f" ± {fmt.format(std)}")
    return fmt.format(value)

  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def results_markdown(sweep: Sweep, rows: list[dict]) -> str:
  """The results table: one row per member; with several seeds, mean ± standard deviation
  over them, then every run."""
  if not sweep.seeded:
    return markdown_table(rows)
  summary_columns = [c for c in COLUMNS if c[0] != "status"] + [("status", "runs", "{}")]
  per_seed = [c for c in COLUMNS if c[0] in ("member", *SPREAD_KEYS, "steps", "status")]
  per_seed.insert(1, ("seed", "seed", "{}"))
  return (f"Mean ± sample standard deviation over seeds {', '.join(map(str, sweep.seeds))} "
          f"(`seed` and `data.shuffle_seed`):\n\n" + markdown_table(seed_summary(rows),
                                                                 summary_columns)
          + "\nEach seed:\n\n" + markdown_table(rows, per_seed))


def write_csv(rows: list[dict], path: Path) -> None:
  import csv
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def collect(sweep: Sweep, size: str, root: Path, results: Path, invocation: str) -> list[dict]:
  """Writes results.csv, results.md and the plots for every member run so far. Refuses when
  no run of the sweep is under `root` (a wrong --workdir_root, or the runs made elsewhere), so
  that tables of earlier runs in `results` are not replaced by empty ones."""
  if not any((root / name / "metrics.jsonl").is_file() for name, _, _ in sweep.runs()):
    raise SweepError(f"no run of this sweep has started under {root}: nothing to collect "
                     f"({results} is left as it is); give the --workdir_root the runs used")
  rows = [member_result(sweep, member, root / name, seed) for name, member, seed in sweep.runs()]
  results.mkdir(parents=True, exist_ok=True)
  write_csv(rows, results / "results.csv")
  header = (f"# {sweep.name} ({size})\n\n{sweep.question}\n\n"
            f"- command: `{invocation}`\n- base: `--config={sweep.config}` "
            + " ".join(f"`--config.{k}={_flag_value(v)}`" for k, v in sweep.base.items())
            + f"\n- machine: {'; '.join(_machines(root, sweep))}\n"
            f"- date: {datetime.date.today().isoformat()}\n\n")
  (results / "results.md").write_text(header + results_markdown(sweep, rows))
  records = {name: metrics.read_jsonl(root / name / "metrics.jsonl") for name, _, _ in sweep.runs()}
  curve = lambda key: {m: [(r["step"], r[key]) for r in rs if key in r] for m, rs in records.items()}
  curves = {"validation_loss": curve("validation_loss"), "max_violation": curve("max_violation")}
  (results / "curves.json").write_text(json.dumps(curves))
  metrics.plot_curves(curves["validation_loss"], "validation loss (nats/token)",
                      results / "validation_loss.png", f"{sweep.name}: validation loss")
  metrics.plot_curves(curves["max_violation"], "MaxVio per batch (mean over MoE layers)",
                      results / "max_violation.png", f"{sweep.name}: training MaxVio", log_y=True)
  loads = {}
  for name, _, _ in sweep.runs():
    path = root / name / "expert_load.json"
    if path.is_file():
      loads[name] = json.loads(path.read_text())["counts"]
  (results / "expert_loads.json").write_text(json.dumps(loads))
  if loads:
    metrics.plot_load_grid(loads, results / "expert_load.png",
                           f"{sweep.name}: validation expert load / mean, per MoE layer")
  return rows


def _members(sweep: Sweep, text: str) -> Sweep:
  """The sweep restricted to the named members (comma-separated), in the sweep's order."""
  names = [name for name in text.split(",") if name]
  unknown = [name for name in names if name not in sweep.members]
  if unknown or not names:
    raise SweepError(f"--members={text!r}: unknown member(s) {unknown}; the sweep has "
                     f"{list(sweep.members)}")
  return dataclasses.replace(sweep, members={m: o for m, o in sweep.members.items() if m in names})


def _machines(root: Path, sweep: Sweep) -> list[str]:
  """Where the runs ran (each run's machine.json; this machine for a run that has none)."""
  from moe_jax.train import MACHINE_FILE, machine
  seen = []
  for name, _, _ in sweep.runs():
    if not (root / name).is_dir():
      continue
    path = root / name / MACHINE_FILE
    m = json.loads(path.read_text()) if path.is_file() else machine()
    line = (f"{m['devices']} ({m['backend']}), {m['cpu_cores']} CPU cores, Python "
            f"{m['python']}, jax {m['jax']}")
    if line not in seen:
      seen.append(line)
  return seen or ["no run yet"]


def _seeds(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise SweepError(f"--seeds={text!r}: expected comma-separated integers such as 0,1,2") from None
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise SweepError(f"--seeds={text!r}: seeds must be distinct and >= 0")
  return seeds


def _check_output_folders(folders: dict[str, tuple[str, Path]]) -> None:
  """Refuses, before any member runs, an output folder the sweep could not write into (a file
  in the way, no permission), given as {flag: (its value, the sweep's folder in it)}: found
  when first written, a bad --results would stop the sweep after hours of runs."""
  from moe_jax.workdir import WorkdirError, check_workdir
  try:
    for flag, (given, folder) in folders.items():
      check_workdir(given, flag)    # the value as given is named first...
      check_workdir(folder, flag)   # ...then the sweep's folder in it
  except WorkdirError as error:
    raise SweepError(str(error)) from None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.sweep", description=__doc__.split("\n")[0])
  parser.add_argument("sweep", help="a sweep file and its size: experiments/NAME.py:SIZE")
  parser.add_argument("--workdir_root", default="runs/sweeps", help="members' workdirs go under it")
  parser.add_argument("--results", default="experiments/results",
                      help="tables and plots go to RESULTS/<sweep>_<size>/")
  parser.add_argument("--print_commands", action="store_true",
                      help="print one launch command per unfinished member instead of running")
  parser.add_argument("--collect_only", action="store_true", help="only write tables and plots")
  parser.add_argument("--seeds", default="",
                      help="comma-separated seeds to run each member with (default: the sweep's)")
  parser.add_argument("--members", default="",
                      help="comma-separated members to run or tabulate (default: every member)")
  args = parser.parse_args(argv)
  try:
    sweep, size = load_sweep(args.sweep)
    if args.seeds:
      sweep = dataclasses.replace(sweep, seeds=_seeds(args.seeds), named_seeds=True)
    if args.members:
      sweep = _members(sweep, args.members)
    label = f"{sweep.name}_{size}"
    root = Path(args.workdir_root) / label
    if not args.print_commands:   # which writes nothing
      folders = {} if args.collect_only else {"--workdir_root": (args.workdir_root, root)}
      folders["--results"] = (args.results, Path(args.results) / label)
      _check_output_folders(folders)
    if not args.collect_only:
      run_sweep(sweep, size, root, args.print_commands)
    if not args.print_commands:
      invocation = f"python -m moe_jax.sweep {args.sweep}" + (
          f" --seeds={args.seeds}" if args.seeds else "") + (
          f" --members={args.members}" if args.members else "") + (
          f" --workdir_root={args.workdir_root}" if args.workdir_root != "runs/sweeps" else "")
      rows = collect(sweep, size, root, Path(args.results) / label, invocation)
      print(results_markdown(sweep, rows))
      print(f"Results in {Path(args.results) / label}")
  except SweepError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except SweepStopped as stop:
    print(stop, file=sys.stderr)
    return stop.exit_code
  except KeyboardInterrupt:   # Ctrl-C while no member runs
    print("sweep stopped by SIGINT; run the same command again to resume it", file=sys.stderr)
    return 128 + signal.SIGINT
  except BrokenPipeError:   # the output went to a command that stopped reading (`| head`)
    return quiet_exit_status()
  return 0


if __name__ == "__main__":
  sys.exit(main())
