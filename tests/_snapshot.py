"""What is on disk under a folder, to prove that a failed or refused operation changed nothing.

One walker for every test that compares a folder before and after (stores, runs, shard
files, CLI targets). ``tests/`` is on ``sys.path`` (its ``conftest.py`` is not in a package),
so any test imports it as ``from _snapshot import tree_sha256``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any


def _walk(root: str | os.PathLike, read: Callable[[str], Any]) -> dict[str, Any]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = read(p)
    return out


def _read_bytes(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def tree_bytes(root: str | os.PathLike) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root`` (empty when absent)."""
    return _walk(root, _read_bytes)


def tree_sha256(root: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 hex digest of every file under ``root`` (empty when absent)."""
    return _walk(root, lambda p: hashlib.sha256(_read_bytes(p)).hexdigest())


def tree_mtimes(root: str | os.PathLike) -> dict[str, int]:
    """Relative path -> ``st_mtime_ns`` of every file under ``root``: proves nothing was rewritten."""
    return _walk(root, lambda p: os.stat(p).st_mtime_ns)
