"""The audit's on-disk cache: checkpoints, score tables and evaluations, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CACHE_SCHEMA = 1
"""Version of the cache layout; part of every key so a layout change never reuses entries."""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AuditCache:
    """On-disk cache of checkpoints (dirs), score tables (Parquet) and evaluations (JSON).

    Layout under ``root``: ``train/<key>/{meta.json, checkpoint/}``,
    ``scores/<key>.parquet`` and ``evals/<key>.json``. An entry exists only once it is
    complete: each is built under a ``.tmp-*`` sibling and renamed into place. A process
    killed by a signal can leave such a sibling behind; it is never read (only final
    names are) and may be deleted at any time.
    """

    def __init__(self, root: str | os.PathLike, subset: Mapping[str, Any]):
        self.root = Path(root)
        self.subset = dict(subset)
        for sub in ("train", "scores", "evals"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def key(self, kind: str, **parts: Any) -> str:
        """Cache key: hash of (schema, kind, config subset, parts)."""
        return digest({"schema": CACHE_SCHEMA, "kind": kind, "subset": self.subset, **parts})

    # -- checkpoints
    def train_dir(self, key: str) -> Path:
        return self.root / "train" / key

    def has_train(self, key: str) -> bool:
        return (self.train_dir(key) / "meta.json").is_file()

    def train_meta(self, key: str) -> dict[str, Any]:
        with open(self.train_dir(key) / "meta.json") as fh:
            return json.load(fh)

    def commit_train(self, key: str, tmp: Path, meta: Mapping[str, Any]) -> Path:
        """Write ``meta.json`` into ``tmp`` and rename it to the final entry."""
        _write_json_atomic(tmp / "meta.json", dict(meta))
        final = self.train_dir(key)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another worker finished the same condition first; its entry is equivalent.
            if not self.has_train(key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def new_tmp(self, key: str) -> Path:
        tmp = self.root / "train" / f".{key}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    # -- scores
    def load_scores(self, key: str) -> dict[str, float] | None:
        path = self.root / "scores" / f"{key}.parquet"
        if not path.is_file():
            return None
        import pyarrow.parquet as pq

        t = pq.read_table(path).to_pydict()
        return {e: float(s) for e, s in zip(t["episode_id"], t["score"])}

    def save_scores(self, key: str, scores: Mapping[str, float]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = sorted(scores)
        table = pa.table({"episode_id": ids, "score": [float(scores[e]) for e in ids]})
        path = self.root / "scores" / f"{key}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    # -- evaluations
    def load_eval(self, key: str) -> dict[str, Any] | None:
        path = self.root / "evals" / f"{key}.json"
        if not path.is_file():
            return None
        with open(path) as fh:
            return json.load(fh)

    def save_eval(self, key: str, record: Mapping[str, Any]) -> None:
        _write_json_atomic(self.root / "evals" / f"{key}.json", dict(record))
