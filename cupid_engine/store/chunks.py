"""Chunk files of a run's zarr arrays: the codec chain, and the direct fast path.

For local stores without a compressor, a zarr chunk file is exactly the chunk's C-order
bytes followed by their crc32c, so chunks are encoded, checksummed and written (and read
back) by a small thread pool directly, byte-identical to what zarr writes; zarr's own
decoder reads them (``verify`` uses it). Other stores and compressed runs go through
zarr's codec pipeline.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore


def _codecs(compressor: str) -> list:
    if compressor == "none":
        head = []
    elif compressor == "blosc-lz4":
        head = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    elif compressor == "zstd":
        head = [zarr.codecs.ZstdCodec(level=1)]
    else:
        raise ValueError(f"unknown compressor {compressor!r}")
    # Checksum last so it covers the bytes as stored on disk.
    return head + [zarr.codecs.Crc32cCodec()]


_THREADS = min(4, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads that encode and write chunks; numpy casts, crc32c and write() drop the GIL."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="cupid-store")
        return _POOL


def _reset_pool_after_fork() -> None:
    # Threads do not survive fork(); a child must build its own pool.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _direct_dir(array: zarr.Array) -> str | None:
    """Directory of ``array`` when its chunks can be written without zarr's encoder.

    That is the case for a local store and the codec chain bytes(little endian) ->
    crc32c (no compressor), where a chunk file is exactly the C-order bytes of the chunk
    followed by their crc32c (uint32, little endian). Any other layout returns None and
    zarr encodes the chunk: the stored bytes are the same either way, only faster here.
    """
    store = array.store_path.store
    codecs = array.metadata.codecs
    if not isinstance(store, LocalStore) or sys.byteorder != "little" or len(codecs) != 2:
        return None
    if not isinstance(codecs[0], zarr.codecs.BytesCodec) or not isinstance(codecs[1], zarr.codecs.Crc32cCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return None
    if array.metadata.chunk_key_encoding.name != "default":
        return None
    return os.path.join(str(store.root), array.store_path.path)


def _write_chunk_file(path: str, chunk: np.ndarray, *, atomic: bool = False) -> None:
    """One zarr chunk file: raw bytes then their crc32c, as zarr's crc32c codec lays them out.

    ``atomic`` writes a temporary file and renames it (used for completion markers).
    """
    view = memoryview(np.ascontiguousarray(chunk)).cast("B")
    checksum = np.uint32(crc32c.crc32c(view)).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if atomic:
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(view)
            f.write(checksum)
        os.replace(tmp, path)
        return
    # Overwrite in place rather than O_TRUNC: a rewrite of an uncompressed chunk has the
    # same size, and reusing the cached pages is ~10x cheaper than freeing them.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = len(view) + len(checksum)
        if os.writev(fd, [view, checksum]) != size:
            raise OSError(f"short write to {path}")
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _read_chunk_file(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """Inverse of :func:`_write_chunk_file`; None when the chunk was never written.

    Raises:
        ValueError: wrong size or checksum mismatch.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    body_len = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != body_len + 4:
        raise ValueError(f"chunk file has {len(data)} bytes, expected {body_len + 4} (truncated or foreign)")
    body = memoryview(data)[:body_len]
    if np.uint32(crc32c.crc32c(body)).tobytes() != data[body_len:]:
        raise ValueError("stored and computed crc32c checksum do not match")
    return np.frombuffer(body, dtype=dtype).reshape(shape)
