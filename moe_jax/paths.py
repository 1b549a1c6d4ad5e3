"""Files the commands find from any working directory.

`configs/` and `experiments/` live in the checkout beside the package (they are not installed
with it). A relative path on the command line is read from the current directory first and,
when it is not there, from the checkout, so `python -m moe_jax.main` (default config) and
`--config=configs/default.py:tiny` work wherever the command runs.
"""

from pathlib import Path

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
  where = str(Path(path)) if Path(path).is_absolute() else (
      f"{Path.cwd() / path} or {CHECKOUT / path}")
  hint = ("" if (CHECKOUT / "configs").is_dir() else
          "; moe_jax is installed without its checkout, so configs/ and experiments/ are not "
          "beside it: clone the repository and run from it, or pass the file's path")
  return f"{flag}: no such file {path!r} (looked for {where}){hint}"
