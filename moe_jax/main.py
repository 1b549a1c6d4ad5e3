"""Command line: python -m moe_jax.main --config=configs/default.py --workdir=DIR [--config.x.y=v].

A config, data or checkpoint mistake prints one clear message and exits with status 2, no
traceback; a run stopped by SIGTERM/SIGINT saves a checkpoint and exits with 128 + the signal
number (143, 130); a run that keeps producing bad numbers exits with 3.
Launched as one process of many (--distributed), it joins the others through
jax.distributed.initialize, which reads the cluster from SLURM, Open MPI, Kubernetes or TPU
metadata, or from --coordinator_address, --num_processes and --process_id.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.",
                    required=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process runs); "
                  "on SLURM, Open MPI, Kubernetes and TPU VMs it finds the other processes itself.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed, when "
                    "the cluster is not detected).")
flags.DEFINE_integer("num_processes", None, "How many processes (--distributed, undetected cluster).")
flags.DEFINE_integer("process_id", None, "This process's index (--distributed, undetected cluster).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save step at INFO
  if FLAGS.distributed:
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  sys.exit(run(FLAGS.config, FLAGS.workdir))


def run(config, workdir: str) -> int:
  """Trains; returns the exit status. Mistakes print one `error:` line (or block) and give 2;
  a preemption gives 128 + the signal number; a diverged run gives 3."""
  from moe_jax.checkpoint import CheckpointMismatch
  from moe_jax.config_validation import ConfigError
  from moe_jax.data import DataError
  from moe_jax.guard import TrainingDiverged
  from moe_jax.preemption import Preempted
  from moe_jax.train import train_and_evaluate
  try:
    train_and_evaluate(config, workdir)
  except (ConfigError, DataError, CheckpointMismatch) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except TrainingDiverged as error:
    print(f"error: {error}", file=sys.stderr)
    return 3
  except Preempted as stop:
    print(stop, file=sys.stderr)
    return stop.exit_code
  return 0


def parse_flags(argv):
  """absl flag parsing, with a one-line error for overrides of fields the config lacks."""
  try:
    return FLAGS(argv)
  except (flags.Error, ValueError) as error:   # ValueError: a config file rejected its argument
    lines = str(error).strip().splitlines()
    # A config file that raised is reported with its traceback inside the message: keep the
    # first line (which flag) and the last (why).
    print("error: " + (f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0]), file=sys.stderr)
  except (AttributeError, KeyError) as error:
    name = str(error).strip("\"'")
    culprits = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a]
    print(f"error: {' '.join(culprits) or name}: the config has no field {name!r}",
          file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
