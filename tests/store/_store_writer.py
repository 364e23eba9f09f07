"""Shared test helpers for the gradient store, also runnable as a writer process.

As a script it writes the listed shards of a run with deterministic features, printing
``begin <shard>`` / ``done <shard>`` (flushed) so a test can SIGKILL it mid-shard:

    python _store_writer.py STORE RUN SHARD[,SHARD...]

Features depend only on (shard, rows, k), so any schedule of writers produces the same
bytes as a sequential write.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def shard_features(shard_id: int, rows: int, k: int) -> np.ndarray:
    """``[rows, k]`` float32 deterministic features of one shard."""
    rng = np.random.default_rng([20260, shard_id])
    return rng.standard_normal((rows, k), dtype=np.float32)


def episode_table(n: int, *, prefix: str = "ep", seed: int = 0, max_len: int = 40) -> pa.Table:
    """``n`` episodes with odd lengths and mixed splits."""
    rng = np.random.default_rng(seed)
    splits = np.array(["train", "train", "holdout", "rollout"])
    return pa.table(
        {
            "episode_id": [f"{prefix}_{i:04d}" for i in range(n)],
            "split": list(splits[rng.integers(0, len(splits), n)]),
            "length": rng.integers(1, max_len, n).astype(np.int64),
            "success": rng.random(n) > 0.5,
            "tier": ["better"] * n,
        }
    )


def write_shards(store, run, shards) -> None:
    for s in shards:
        print(f"begin {s}", flush=True)
        ids, lengths = store.shard_episodes(s)
        run.write_shard(s, ids, shard_features(s, int(lengths.sum()), run.k), lengths)
        print(f"done {s}", flush=True)


def snapshot(run) -> dict[str, np.ndarray]:
    """Every array of a run, read raw from zarr, plus the finalized Gram state."""
    out = {name: np.asarray(run._group[name][...]) for name in sorted(run._group.array_keys())}
    out["gram_count"] = np.asarray(run.gram_count)
    return out


def main(argv: list[str]) -> int:
    sys.path.insert(0, REPO)
    from cupid_engine.store.gradient_store import open_store

    path, run_name, shards = argv[0], argv[1], [int(s) for s in argv[2].split(",") if s]
    store = open_store(path, mode="r+")
    write_shards(store, store.run(run_name), shards)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
