"""Path resolution for data and asset files so configs work from any working directory."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root: the parent directory of the ``vlm`` package."""


def resolve_path(path: str) -> str:
  """Resolves a possibly relative path against the cwd, then the repository root.

  Order: ``~`` expanded; an absolute path is returned as is; otherwise ``cwd/path`` if it exists,
  else ``REPO_ROOT/path`` if it exists, else ``cwd/path`` (so the caller's "not found" error
  names the path the user most likely meant).

  Args:
    path: file or directory path, e.g. ``"data/coco"`` or ``"vlm/assets/.../vocab.txt"``.

  Returns:
    An absolute path (which may not exist).

  Raises:
    ValueError: if ``path`` is not a non-empty string.
  """
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f"expected a non-empty path string, got {path!r}")
  path = os.path.expanduser(os.fspath(path))
  if os.path.isabs(path):
    return path
  from_cwd = os.path.abspath(path)
  if os.path.exists(from_cwd):
    return from_cwd
  from_repo = os.path.join(REPO_ROOT, path)
  if os.path.exists(from_repo):
    return from_repo
  return from_cwd
