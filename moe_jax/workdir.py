"""The workdir of a run: checked before anything is written, and held by one run at a time.

A run holds an exclusive `flock` on the workdir directory itself while it trains, so no lock
file is written and a run killed by any means releases it (the kernel drops the lock with the
process). A second run on the same workdir, or a sweep member left running by a killed
runner, is refused with the holder's process id instead of writing the same metrics and
checkpoints. In runs of several processes, process 0 holds it for all.
"""

import errno
import fcntl
import os
from pathlib import Path


class WorkdirError(ValueError):
  """The workdir cannot be used; the message says why and what to do."""


def check_workdir(workdir: str | Path, flag: str = "--workdir") -> Path:
  """The workdir (or another directory a command writes into, given as `flag`) as a Path;
  raises WorkdirError for an empty name, a path that is or lies below a regular file, or a
  directory that cannot be written."""
  if not str(workdir).strip():
    raise WorkdirError(f"{flag} is empty: give the directory for the run's checkpoints, "
                       f"metrics and outputs (for example {flag}=runs/my_run)")
  path = Path(workdir).expanduser()
  for ancestor in [path, *path.absolute().parents]:
    if ancestor.exists() or ancestor.is_symlink():
      if not ancestor.is_dir():
        where = "is" if ancestor == path else f"lies below {ancestor}, which is"
        raise WorkdirError(f"{flag}={workdir} {where} not a directory; use a new {flag}")
      if not os.access(ancestor, os.W_OK | os.X_OK):
        raise WorkdirError(f"{flag}={workdir}: {ancestor} is not writable")
      break
  return path


def lock_holder(path: Path) -> int | None:
  """The process id holding an flock on `path`, when /proc/locks shows it (Linux, this host)."""
  try:
    inode, device = os.stat(path).st_ino, os.stat(path).st_dev
    for line in Path("/proc/locks").read_text().splitlines():
      fields = line.split()
      if len(fields) > 5 and fields[1] == "FLOCK":
        major, minor, node = fields[5].split(":")
        if (int(node) == inode and int(major, 16) == os.major(device)
            and int(minor, 16) == os.minor(device)):
          return int(fields[4])
  except (OSError, ValueError):
    pass
  return None


class WorkdirLock:
  """An exclusive, non-blocking lock on an existing directory, held until `release`."""

  def __init__(self, path: Path):
    self.path, self.descriptor = Path(path), None
    descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(descriptor)
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
        return   # a file system without flock (some network mounts): run unguarded
      holder = lock_holder(self.path)
      raise WorkdirError(
          f"--workdir={self.path} is in use by another run"
          + (f" (process {holder})" if holder else "")
          + ": two runs in one workdir would write the same metrics and checkpoints; wait for "
          "it to end, stop it, or use another --workdir") from None
    self.descriptor = descriptor

  def release(self) -> None:
    if self.descriptor is not None:
      os.close(self.descriptor)   # closing the descriptor drops the lock
      self.descriptor = None
