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


def init_distributed(*, multihost: bool = False, coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None,
                     local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts ``jax.distributed`` for a multi-process run (call it before any other jax work).

  Two ways, as on a pod slice or a GPU cluster:

  * ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and ``process_id``
    given (``local_device_ids`` optional): passed to ``jax.distributed.initialize`` as they are;
  * ``multihost`` alone: the cluster is auto-detected (TPU pod slice metadata, Slurm, Open MPI).

  Returns whether ``jax.distributed`` was initialised (False: a single-process run).

  Raises:
    ConfigError: part of the explicit flags only (names the missing ones), a ``process_id``
      outside ``[0, num_processes)``, or ``multihost`` with no cluster detected (names the flags
      to pass instead).
  """
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [k for k, v in explicit.items() if v not in (None, "")]
  if not given and not multihost:
    if local_device_ids:
      raise ConfigError("--local_device_ids applies to a multi-process run: add --multihost or "
                        "--coordinator_address/--num_processes/--process_id")
    return False
  import jax
  if given:
    missing = [k for k in explicit if k not in given]
    if missing:
      raise ConfigError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process "
                        "run needs all three (--coordinator_address=<process 0 host>:<port> "
                        "--num_processes=N --process_id=0..N-1), or --multihost alone for "
                        "cluster auto-detection")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, --num_processes="
                        f"{num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r} needs a port: "
                        "<process 0 host>:<port>, e.g. 10.0.0.1:1234")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids else None)
    return True
  try:
    jax.distributed.initialize(
        local_device_ids=list(local_device_ids) if local_device_ids else None)
  except (ValueError, RuntimeError) as e:
    if "should be defined" not in str(e) and "must be defined" not in str(e):
      raise
    raise ConfigError(
        f"--multihost found no cluster to join ({e}): auto-detection knows TPU pod slices, Slurm "
        "and Open MPI. Elsewhere pass --coordinator_address=<process 0 host>:<port> "
        "--num_processes=N --process_id=<0..N-1> on every process (and optionally "
        "--local_device_ids)") from e
  return True
