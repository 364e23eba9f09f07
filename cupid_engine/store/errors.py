"""What can be wrong with a gradient store: its errors, and the report of ``verify``.

Below both :mod:`~cupid_engine.store.gradient_store` and :mod:`~cupid_engine.store.run`,
which raise and fill them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cupid_engine.errors import StoreError

__all__ = ["CorruptChunk", "CorruptChunkError", "RunIncompleteError", "SchemaVersionError", "StoreKeyError",
           "VerifyReport"]


class SchemaVersionError(StoreError):
    """The store (or a run) was written with another on-disk schema version."""


class CorruptChunkError(StoreError):
    """A chunk failed its checksum (or could not be decoded); names the episodes it covers."""


class RunIncompleteError(StoreError, RuntimeError):
    """Features asked for episodes whose shards are not written yet."""


class StoreKeyError(StoreError, KeyError):
    """An episode id or run the store lacks (a ``KeyError`` for callers that catch one)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class _Damaged(StoreError, FileNotFoundError):
    """A file every store has is missing."""


@dataclasses.dataclass(frozen=True)
class CorruptChunk:
    """One unreadable chunk found by ``GradientStore.verify``."""

    run: str
    array: str
    chunk: int
    episode_ids: tuple[str, ...]
    error: str

    def describe(self) -> str:
        ids = ", ".join(self.episode_ids[:8]) + (" ..." if len(self.episode_ids) > 8 else "")
        return f"run {self.run!r} array {self.array!r} chunk {self.chunk}: episodes [{ids}]: {self.error}"


@dataclasses.dataclass
class VerifyReport:
    """Result of ``GradientStore.verify``."""

    chunks_checked: int = 0
    problems: list[CorruptChunk] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def corrupt_episode_ids(self) -> list[str]:
        """Every episode whose stored data touches a corrupt chunk, in catalog order of discovery."""
        out: dict[str, None] = {}
        for p in self.problems:
            out.update(dict.fromkeys(p.episode_ids))
        return list(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }
