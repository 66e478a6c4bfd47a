"""Command-line checks for ``--config path.py[:variant]`` and ``--config.a.b=value`` overrides.

``ml_collections.config_flags`` reports a missing config file as two chained tracebacks and an
unknown override key as a bare ``AttributeError: "'learning_rate'"``. :func:`check_config_argv`
runs first (before absl parses the flags) and turns both into one message that names the file or
the key, the valid choices, and the closest match. It loads the config once to do so (config
files are cheap: they build an ``ml_collections.ConfigDict`` and nothing else).
"""
from __future__ import annotations

import difflib
import glob
import importlib.util
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says what to type instead."""


def _nearest(word: str, choices: Sequence[str]) -> str | None:
  """The choice a user most likely meant: a close spelling, the initials of ``word``'s
  underscore-separated parts (``learning_rate`` -> ``lr``), or a choice containing ``word``."""
  choices = list(choices)
  near = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
  if near:
    return near[0]
  initials = "".join(w[:1] for w in word.split("_") if w)
  if len(initials) > 1 and initials in choices:
    return initials
  containing = [c for c in choices if word and word in c]
  return containing[0] if len(containing) == 1 else None


def _closest(word: str, choices: Sequence[str]) -> str:
  near = _nearest(word, choices)
  return f"; did you mean {near!r}?" if near else "."


def _config_spec(argv: Sequence[str], flag: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py[:arg]`` by calling the file's ``get_config(arg)``.

  Raises:
    ConfigError: the file does not exist (names the config files next to it and the closest
      one), has no ``get_config``, or ``get_config`` rejects the variant (its message is kept).
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    here = sorted(glob.glob(os.path.join(folder, "*.py")))
    if not here:
      here = sorted(glob.glob(os.path.join("configs", "**", "*.py"), recursive=True))
    listing = ", ".join(here) if here else "none"
    raise ConfigError(f"config file not found: {path!r} (from --config={spec})"
                      f"{_closest(path, here)} Config files: {listing}")
  module_spec = importlib.util.spec_from_file_location("_vlm_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path} does not parse: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg)")
  try:
    return module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{path}: {e}") from e


def check_override_key(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Checks that ``dotted`` (``"optim.lr"``) names a field of ``config``.

  Raises:
    ConfigError: naming the first unknown part, the fields valid there and the closest one.
  """
  node = config
  parts = dotted.split(".")
  for depth, part in enumerate(parts):
    where = ".".join(parts[:depth]) or "the config"
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"unknown config key {dotted!r}: {where} is a value "
                        f"({type(node).__name__}), not a group of fields")
    keys = sorted(node.keys())
    if part not in keys:
      near = _nearest(part, keys)
      suggestion = (f"; did you mean {'.'.join(parts[:depth] + [near])!r}?" if near else ".")
      raise ConfigError(f"unknown config key {dotted!r}: {where} has no field {part!r}"
                        f"{suggestion} Fields of {where}: {', '.join(keys)}")
    node = node[part]


def check_config_argv(argv: Sequence[str], flag: str = "config") -> None:
  """Checks the ``--config`` file and every ``--config.key=value`` override in ``argv``.

  Does nothing when no ``--config`` is given (absl then reports the missing required flag).

  Raises:
    ConfigError: see :func:`load_config_file` and :func:`check_override_key`.
  """
  spec = _config_spec(argv, flag)
  if spec is None:
    return
  config = load_config_file(spec)
  prefix = f"--{flag}."
  for arg in argv:
    if arg.startswith(prefix):
      key = arg[len(prefix):].split("=", 1)[0]
      check_override_key(config, key)
