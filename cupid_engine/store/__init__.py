"""Chunked Zarr v3 gradient store (DESIGN §4).

- :mod:`~cupid_engine.store.gradient_store`: the store, its catalog and verification.
- :mod:`~cupid_engine.store.location`: where a store lives (path or URL), its layout names.
- :mod:`~cupid_engine.store.catalog_io`: reading and writing ``catalog.parquet``.
- :mod:`~cupid_engine.store.undo`: :class:`StoreUndo`, a failed command's changes put back.
- :mod:`~cupid_engine.store.errors`: the store's errors and the ``verify`` report.
- :mod:`~cupid_engine.store.reader`: the ``StoreReader`` protocol (what scorers read).
- :mod:`~cupid_engine.store.run`: one featuriser run: sharded writes, resume, reads.
- :mod:`~cupid_engine.store.chunks`: a run's chunk files (codecs, the direct fast path).
- :mod:`~cupid_engine.store.catalog`: catalog schema and the deterministic shard plan.
- :mod:`~cupid_engine.store.quant`: storage dtypes (fp32/fp16/bf16/int8+scale).
- :mod:`~cupid_engine.store.config`: :class:`RunConfig`.
"""

from cupid_engine.store.config import COMPRESSORS, STORAGE_DTYPES, RunConfig
from cupid_engine.store.gradient_store import (
    CorruptChunk,
    CorruptChunkError,
    GradientStore,
    SchemaVersionError,
    VerifyReport,
    create_store,
    open_store,
)
from cupid_engine.store.run import Run

__all__ = [
    "COMPRESSORS",
    "STORAGE_DTYPES",
    "CorruptChunk",
    "CorruptChunkError",
    "GradientStore",
    "Run",
    "RunConfig",
    "SchemaVersionError",
    "VerifyReport",
    "create_store",
    "open_store",
]
