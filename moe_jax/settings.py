"""Settings objects: frozen dataclasses with defaults and their own checks, one per config
section, each living beside the code that reads it (routing/settings.py, dispatch/settings.py,
model.py) and built from its section by keyword.

A field's annotation is its type in a config file (int, float, bool or str). Building one
checks the types, then the values (`problems`); what is wrong raises `ConfigError` naming
every offending `section.field`. The config schema and its unknown-field messages are these
fields (config_validation.py), so a new setting is one line in one dataclass.
"""

import dataclasses
import math
from typing import ClassVar

INT_LIMIT = 2**31   # every integer setting is a size, count, step, seed or port: int32 holds it


class ConfigError(ValueError):
  """The config cannot run; the message names each offending field."""

  def __init__(self, message: str, problems: list[str] | None = None):
    super().__init__(message)
    self.problems = problems if problems is not None else [message]

  @classmethod
  def listing(cls, problems: list[str]) -> "ConfigError":
    """One error listing every problem, one per line."""
    return cls("invalid config:\n  - " + "\n  - ".join(problems), problems)


def type_name(kind: type) -> str:
  return {int: "an integer", float: "a number", bool: "True or False", str: "a string"}[kind]


def has_type(value, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def value_problem(name: str, value, kind: type) -> str | None:
  """Why `value` (of type `kind`) can be no setting's value: of another type, NaN or infinite,
  or an integer past int32 (which the compiled program would wrap or refuse); None if fine."""
  if not has_type(value, kind):
    return f"{name}={value!r} must be {type_name(kind)}"
  if kind is float and not math.isfinite(value):
    return f"{name}={value!r} must be a finite number"
  if kind is int and not -INT_LIMIT < value < INT_LIMIT:
    return f"{name}={value!r} is out of range (|value| < 2^31)"
  return None


@dataclasses.dataclass(frozen=True)
class Settings:
  """Base of the settings dataclasses. Subclasses set SECTION and override `problems`."""

  SECTION: ClassVar[str] = ""

  def __post_init__(self):
    problems = self.type_problems() or self.problems()
    if problems:
      raise ConfigError.listing(problems)

  @classmethod
  def field_types(cls) -> dict[str, type]:
    """The fields a config section of this kind holds, with their types (nested settings,
    which come from sections of their own, excluded)."""
    return {f.name: f.type for f in dataclasses.fields(cls) if f.type in (int, float, bool, str)}

  @classmethod
  def from_section(cls, section, **nested):
    """Built from a config section by keyword; a field the section lacks (a config written
    before the field existed) takes its default."""
    return cls(**{name: section[name] for name in cls.field_types() if name in section}, **nested)

  @classmethod
  def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}

  @classmethod
  def unchecked(cls, section):
    """Built from a section without its checks: a stand-in that lets the checks spanning
    sections run (and report) while this section's own problems are reported too."""
    settings = object.__new__(cls)
    for name, value in {**cls.field_defaults(), **dict(section)}.items():
      object.__setattr__(settings, name, value)
    return settings

  def type_problems(self) -> list[str]:
    return [p for name, kind in self.field_types().items()
            if (p := value_problem(self.name(name), getattr(self, name), kind))]

  def problems(self) -> list[str]:
    """Each value this object cannot run with, naming its field as `section.field`."""
    return []

  def name(self, field: str) -> str:
    return f"{self.SECTION}.{field}"

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def values(self) -> dict:
    """This section's own fields (nested settings left out), as in a config file."""
    return {name: getattr(self, name) for name in self.field_types()}
