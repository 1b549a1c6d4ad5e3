"""Checked command-line values for the scripts: comma-separated lists of known names or of
whole numbers, and the folders and files they write. A mistyped value stops a script with
argparse's one-line `error:` before anything is built or compiled, instead of a traceback
minutes later (an output path that cannot be written, found after the work) or a table that
silently leaves the unknown name out."""

import argparse
import os
from pathlib import Path


def names(*known: str):
  """argparse type: comma-separated names, each one of `known` -> list of them."""
  def parse(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
      what = ", ".join(map(repr, unknown)) + " unknown" if unknown else "nothing given"
      raise argparse.ArgumentTypeError(
          f"{what}; expected comma-separated names from: {', '.join(known)}")
    return values
  return parse


def whole_numbers(minimum: int = 1):
  """argparse type: comma-separated integers of at least `minimum` -> list of them."""
  def parse(text: str) -> list[int]:
    values = [_whole(v, minimum) for v in text.split(",") if v]
    if not values:
      raise argparse.ArgumentTypeError("nothing given; expected comma-separated integers")
    return values
  return parse


def whole_number(minimum: int = 1):
  """argparse type: one integer of at least `minimum`."""
  return lambda text: _whole(text, minimum)


def _whole(text: str, minimum: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
  return value


def positive_number(text: str) -> float:
  """argparse type: a number above zero."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"{text} is not above 0")
  return value


def writable_directory(text: str) -> Path:
  """argparse type: a directory the script writes into, made (with its parents) when missing,
  so that a path that cannot be one stops the script before its work, not after it."""
  path = Path(text).expanduser()
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:   # a file in the way, a parent that is a file, no permission
    raise argparse.ArgumentTypeError(
        f"{text} cannot be made a directory ({error.strerror or error})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise argparse.ArgumentTypeError(f"{text} is a directory this user cannot write into")
  return path


def writable_file(*suffixes: str):
  """argparse type: a file the script writes, named with one of `suffixes` (a picture's
  format), in a folder it can write into (made when missing)."""
  def parse(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix.lower() not in suffixes:
      raise argparse.ArgumentTypeError(
          f"{text} does not end in one of {', '.join(suffixes)} (the format it is written in)")
    if path.is_dir():
      raise argparse.ArgumentTypeError(f"{text} is a directory; name the file to write")
    try:
      writable_directory(str(path.parent))
    except argparse.ArgumentTypeError as error:
      raise argparse.ArgumentTypeError(f"{text}: its folder {error}") from None
    if path.exists() and not os.access(path, os.W_OK):
      raise argparse.ArgumentTypeError(f"{text} is a file this user cannot write")
    return path
  return parse
