"""Preemption: SIGTERM or SIGINT asks the run to checkpoint at the next step boundary and exit.

`StopSignals` catches the first SIGTERM/SIGINT and only records it; the loop checks it after
each step, saves, and raises `Preempted`. A second SIGINT aborts at once (Ctrl-C twice).
Several processes must stop at the same step: the loop gathers every process's record at log,
evaluation and checkpoint steps (`multihost_utils.process_allgather`), so a signal to any one
process stops them all there.
"""

import os
import signal
import sys
import threading

# A launcher that must not leave its child running (the sweep runner) names itself here.
PARENT_PID_VARIABLE = "MOE_JAX_PARENT_PID"


class Preempted(Exception):
  """The run was asked to stop; it saved a checkpoint at `step` and can be resumed."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(f"stopped by {signal_name} after step {step}: checkpoint saved; run the "
                     f"same command again to resume")
    self.signal_name, self.step = signal_name, step
    self.exit_code = 128 + int(signal.Signals[signal_name])   # the shell's convention


class StopSignals:
  """Context manager that turns the first SIGTERM/SIGINT into a stop request."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, on_request=None):
    self.received: signal.Signals | None = None
    self.on_request = on_request
    self.previous = {}

  @property
  def requested(self) -> bool:
    return self.received is not None

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # the second Ctrl-C: abort without waiting for the step
    self.received = signal.Signals(signum)
    if self.on_request:
      self.on_request(self.received.name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():   # signals reach the main thread only
      self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)
    return False


def stop_with_parent() -> None:
  """When the environment names a parent process (PARENT_PID_VARIABLE), ask Linux to send this
  process SIGTERM when the parent dies, even by SIGKILL, so it checkpoints and stops instead
  of training on with nobody watching; a parent already gone sends it at once."""
  parent = os.environ.get(PARENT_PID_VARIABLE)
  if not parent or not sys.platform.startswith("linux"):
    return
  import ctypes
  PR_SET_PDEATHSIG = 1
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != int(parent):
    os.kill(os.getpid(), signal.SIGTERM)
