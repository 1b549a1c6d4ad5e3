"""A process-wide choice among named implementations, set for a block with a context manager
and read at trace time: how the grouped matmuls and attention pick their paths."""

import contextlib


class Switch:

  def __init__(self, what: str, names: tuple[str, ...], default: str = "auto"):
    self.what, self.names, self.value = what, names, default

  @contextlib.contextmanager
  def using(self, name: str):
    if name not in self.names:
      raise ValueError(f"unknown {self.what} {name!r}; choose from {self.names}")
    previous, self.value = self.value, name
    try:
      yield
    finally:
      self.value = previous
