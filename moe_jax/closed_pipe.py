"""A command's output piped into a reader that stops early (`| head`): the command stops
quietly with status 141 (128 + SIGPIPE), as Unix tools do, not with a BrokenPipeError
traceback."""

import os
import signal
import sys

EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE


def quiet_exit_status() -> int:
  """Points stdout at /dev/null, so the interpreter's last flush raises nothing more, and
  returns the status to exit with."""
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return EXIT_CLOSED_PIPE
