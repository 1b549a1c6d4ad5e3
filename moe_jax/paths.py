"""Files the commands find from any working directory.

`configs/` and `experiments/` live in the checkout beside the package (they are not installed
with it). A relative path on the command line is read from the current directory first and,
when it is not there, from the checkout, so `python -m moe_jax.main` (default config) and
`--config=configs/default.py:tiny` work wherever the command runs.
"""

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

CHECKOUT = Path(__file__).resolve().parent.parent   # the repository root of an editable install
DEFAULT_CONFIG = "configs/default.py"


def locate(path: str) -> Path | None:
  """`path` as given when it exists, else the checkout's file of that relative name, else None."""
  given = Path(path)
  if given.is_file():
    return given
  if not given.is_absolute() and (CHECKOUT / given).is_file():
    return CHECKOUT / given
  return None


def not_found(flag: str, path: str) -> str:
  """One line for a file that `locate` cannot find: where it looked and what to do."""
  places = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, CHECKOUT / path]
  where = " or ".join(dict.fromkeys(str(place) for place in places))   # once from the checkout
  hint = ("" if (CHECKOUT / "configs").is_dir() else
          "; moe_jax is installed without its checkout, so configs/ and experiments/ are not "
          "beside it: clone the repository and run from it, or pass the file's path")
  return f"{flag}: no such file {path!r} (looked for {where}){hint}"


def load_module(path: str) -> ModuleType:
  """The Python file at `path` (found as `locate` finds it) run as a module: a config or sweep
  file. Whatever the file raises propagates."""
  found = locate(path) or Path(path)
  spec = importlib.util.spec_from_file_location(found.stem, found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def call_get_config(get_config, arg: str | None):
  """A config file's `get_config(arg)`; without an argument (`arg` None) `get_config()`, or
  `get_config("")` when its first parameter has no default."""
  parameters = list(inspect.signature(get_config).parameters.values())
  needs_arg = bool(parameters) and parameters[0].default is inspect.Parameter.empty
  return get_config(arg or "") if arg is not None or needs_arg else get_config()


def load_config(argument: str):
  """`FILE.py[:ARG]` -> the config that file's get_config gives (`call_get_config`)."""
  path, has_arg, arg = argument.partition(":")
  return call_get_config(load_module(path).get_config, arg if has_arg else None)
