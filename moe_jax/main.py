"""Command line: python -m moe_jax.main --config=configs/default.py --workdir=DIR [--config.x.y=v].

A mistake in the config file, its overrides, the data, the workdir or a checkpoint prints one
`error:` message and exits with status 2, no traceback, nothing written; a run stopped by
SIGTERM/SIGINT saves a checkpoint and exits with 128 + the signal number (143, 130); a run
that keeps producing bad numbers exits with 3; a checkpoint that could not be saved (a full
disk) stops the run with status 4, the previous checkpoint intact.
Launched as one process of many (--distributed), it joins the others through
jax.distributed.initialize, which reads the cluster from SLURM, Open MPI, Kubernetes or TPU
metadata, or from --coordinator_address, --num_processes and --process_id.
"""

import os
import re
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax.closed_pipe import quiet_exit_status
from moe_jax.paths import DEFAULT_CONFIG, call_get_config, load_module, locate, not_found

FLAGS = flags.FLAGS
EXIT_MISTAKE, EXIT_DIVERGED, EXIT_SAVE_FAILED = 2, 3, 4


def define_flags() -> None:
  """The command's flags. Defining the config flag loads the config file named on the command
  line and applies its overrides, so a mistake there raises here."""
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Experiment config file, PATH[:ARG] (ARG picks a variant, e.g. "
      "configs/default.py:tiny); any field is set with --config.SECTION.FIELD=VALUE. "
      "--print_config lists every field with its value and meaning.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs "
                      "(required to train).")
  flags.DEFINE_bool("print_config", False, "Print the resolved config (every field, its value "
                    "and the config file's comment on it) and exit.")
  flags.DEFINE_bool("dry_run", False, "Validate the config, print parameter counts (total and "
                    "per token), FLOPs per token, the mesh and per-device memory of a training "
                    "step as XLA compiles it, and exit without training or writing anything.")
  flags.DEFINE_bool("skip_corrupt_checkpoints", False, "When the newest checkpoint does not "
                    "verify, move it to WORKDIR/corrupt_checkpoints/ and resume from the newest "
                    "one that does (without it such a checkpoint stops the run).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process "
                    "runs); on SLURM, Open MPI, Kubernetes and TPU VMs it finds the other "
                    "processes itself.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed, when "
                      "the cluster is not detected).")
  flags.DEFINE_integer("num_processes", None, "How many processes (--distributed, undetected "
                       "cluster).")
  flags.DEFINE_integer("process_id", None, "This process's index (--distributed, undetected "
                       "cluster).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save step at INFO
  if FLAGS.print_config:
    from moe_jax.describe import config_text
    path = config_argument(sys.argv[1:]).partition(":")[0]
    try:
      print(config_text(FLAGS.config, path, overridden_fields(sys.argv[1:])), flush=True)
    except BrokenPipeError:   # piped into a reader that stopped (`| head`)
      sys.exit(quiet_exit_status())
    sys.exit(0)
  if FLAGS.dry_run:
    sys.exit(dry_run(FLAGS.config))
  if FLAGS.workdir is None:
    _exit("--workdir is required (the run's directory, for example --workdir=runs/default)")
  from moe_jax.workdir import WorkdirError, check_workdir
  try:   # before jax is imported: a mistyped workdir is refused at once
    check_workdir(FLAGS.workdir)
  except WorkdirError as error:
    _exit(str(error))
  if FLAGS.distributed:
    import jax
    try:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except Exception as error:   # noqa: BLE001 - no cluster found, or bad --process_id/...
      _exit(f"--distributed: jax.distributed.initialize failed ({_describe(error)}); on an "
            f"undetected cluster give --coordinator_address, --num_processes and --process_id")
  sys.exit(run(FLAGS.config, FLAGS.workdir, FLAGS.skip_corrupt_checkpoints))


def run(config, workdir: str, skip_corrupt_checkpoints: bool = False) -> int:
  """Trains; returns the exit status. Mistakes print one `error:` line (or block) and give 2;
  a preemption gives 128 + the signal number; a diverged run gives 3; a failed save gives 4."""
  from moe_jax.checkpoint import CheckpointMismatch, CheckpointSaveFailed
  from moe_jax.config_validation import ConfigError
  from moe_jax.data import DataError
  from moe_jax.guard import TrainingDiverged
  from moe_jax.preemption import Preempted
  from moe_jax.train import train_and_evaluate
  from moe_jax.workdir import WorkdirError
  try:
    train_and_evaluate(config, workdir, skip_corrupt_checkpoints=skip_corrupt_checkpoints)
  except (ConfigError, DataError, CheckpointMismatch, WorkdirError) as error:
    return _fail(error, EXIT_MISTAKE)
  except TrainingDiverged as error:
    return _fail(error, EXIT_DIVERGED)
  except CheckpointSaveFailed as error:
    return _fail(error, EXIT_SAVE_FAILED)
  except Preempted as stop:
    print(stop, file=sys.stderr)
    return stop.exit_code
  except OSError as error:   # the workdir's disk failed under a write (full, gone)
    return _fail(f"{error}; the newest complete checkpoint is kept: fix the disk, then run the "
                 f"same command again to resume", EXIT_SAVE_FAILED)
  except KeyboardInterrupt:   # a second Ctrl-C while the first waited for the step to end
    print("aborted by a second SIGINT without saving; the same command resumes from the "
          "newest checkpoint", file=sys.stderr)
    return 128 + signal.SIGINT
  return 0


def dry_run(config) -> int:
  """--dry_run: the report, or the config's problems (status 2)."""
  from moe_jax.config_validation import ConfigError
  from moe_jax.describe import dry_run as describe
  try:
    print(describe(config), flush=True)
  except ConfigError as error:
    return _fail(error, EXIT_MISTAKE)
  except BrokenPipeError:   # piped into a reader that stopped (`| head`)
    return quiet_exit_status()
  return 0


def overridden_fields(argv: list[str]) -> set[str]:
  """`section.field` names set with --config.section.field=value."""
  return {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}


def _fail(error, status: int) -> int:
  print(f"error: {error}", file=sys.stderr)
  return status


# ---------------------------------------------------------------------------------------------
# The config file and the overrides, checked before absl sees them


def config_argument(argv: list[str]) -> str:
  """The --config value of a command line (the default when there is none)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return DEFAULT_CONFIG


def with_located_config(argv: list[str]) -> list[str]:
  """`argv` with its --config file (or the default one, added) named by the path `locate`
  finds, so a relative name works from any directory; unchanged when there is none."""
  argument = config_argument(argv)
  path, colon, arg = argument.partition(":")
  found = locate(path) if path else None
  if found is None:
    return argv
  located = f"--config={found}{colon}{arg}"
  for i, item in enumerate(argv):
    if item.startswith("--config="):
      return argv[:i] + [located] + argv[i + 1:]
    if item == "--config" and i + 1 < len(argv):
      return argv[:i] + [located] + argv[i + 2:]
  return argv[:1] + [located] + argv[1:]


def config_file_problem(argument: str) -> str | None:
  """What keeps `--config=PATH[:ARG]` from giving a config, in one line; None if it does."""
  path, has_arg, arg = argument.partition(":")
  if not path:
    return "--config is empty: name a config file, for example --config=configs/default.py"
  found = locate(path)
  if found is None:
    return not_found(f"--config={argument}", path)
  path = str(found)
  try:
    module = load_module(path)
  except BaseException as error:   # a config file can raise anything, SystemExit included
    return f"--config={argument}: the file cannot be loaded ({_describe(error)})"
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    return f"--config={argument}: the file defines no get_config() function"
  call = f"get_config({arg!r})" if has_arg else "get_config()"
  try:
    config = call_get_config(get_config, arg if has_arg else None)
  except BaseException as error:
    return f"--config={argument}: {call} raised {_describe(error)}"
  if not isinstance(config, ml_collections.ConfigDict):
    return (f"--config={argument}: {call} returned {type(config).__name__}, not an "
            f"ml_collections.ConfigDict")
  return None


def _describe(error: BaseException) -> str:
  """`Type: first line of the message` (a syntax error's names its file and line)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def override_problem(error: BaseException, argv: list[str]) -> str:
  """One line for an override of a field the config lacks (ml_collections raises a KeyError or
  AttributeError whose text holds a quoted name and a "Did you mean" line) or any other flag
  error."""
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  text = str(message)
  name = text.splitlines()[0].strip().strip("'\"") if text.strip() else ""
  if isinstance(error, (KeyError, AttributeError)) and name:
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    culprits = [a.split("=")[0] for a in argv
                if a.startswith("--config.") and re.search(rf"\.{re.escape(name)}(\.|=|$)", a)]
    from moe_jax.moved_fields import MOVED
    moved = MOVED.get(culprits[0].removeprefix("--config.")) if culprits else None
    if moved:
      return f"{culprits[0]}: the field moved; it is now --config.{moved}"
    return (f"{culprits[0] if culprits else '--config'}: the config has no field {name!r}"
            + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))
  if "must have a value other than None" in str(error):
    flag = re.search(r"--(\w+)", str(error))
    return f"--{flag.group(1) if flag else 'workdir'} is required"
  lines = str(error).strip().splitlines()
  # A config file that raised is reported with its traceback inside the message: keep the
  # first line (which flag) and the last (why).
  return f"{lines[0]} {lines[-1]}" if len(lines) > 1 else (lines[0] if lines else repr(error))


def parse_flags(argv):
  """absl flag parsing, with one `error:` line and status 2 for any mistake."""
  try:
    return FLAGS(argv)
  except Exception as error:   # noqa: BLE001 - every parse failure is the user's input
    _exit(override_problem(error, argv))


def _exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_MISTAKE)


def cli() -> None:
  """The command: checks the config file, defines and parses the flags, trains. A SIGTERM or
  SIGINT outside the training loop (start-up, compilation, the final evaluation) stops the
  command at once: there is no unsaved training to lose."""
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _stop_before_training)
  from moe_jax.preemption import stop_with_parent
  stop_with_parent()
  problem = config_file_problem(config_argument(sys.argv[1:]))
  if problem:
    _exit(problem)
  sys.argv = with_located_config(sys.argv)
  try:
    define_flags()
  except Exception as error:   # noqa: BLE001 - the config's overrides are applied here
    _exit(override_problem(error, sys.argv))
  app.run(main, flags_parser=parse_flags)


def _stop_before_training(signum, frame):
  name = signal.Signals(signum).name
  print(f"stopped by {name} outside the training steps: nothing unsaved is lost; the same "
        f"command resumes from the newest checkpoint", file=sys.stderr)
  os._exit(128 + signum)


if __name__ == "__main__":
  cli()
