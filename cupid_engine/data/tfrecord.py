"""TFRecord framing: length-prefixed records with masked CRC32C checks.

A TFRecord file is a sequence of ``uint64 length``, ``uint32 masked_crc32c(length)``,
``data``, ``uint32 masked_crc32c(data)``. The reader checks both CRCs of every record and
bounds the length before allocating, so a corrupt or truncated file raises
:class:`TFRecordError` naming the file and record index instead of returning garbage or
exhausting memory. No TensorFlow.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import crc32c

from cupid_engine.data._util import url_to_fs
from cupid_engine.data.schema import FormatError

DEFAULT_MAX_RECORD_BYTES = 1 << 30
_CRC_MASK_DELTA = 0xA282EAD8


class TFRecordError(FormatError):
    """A TFRecord file is corrupt or truncated; the message names the file and record."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: ``((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32``."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord(
    path: str | os.PathLike,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    fs: Any = None,
) -> Iterator[bytes]:
    """Yield the records of one TFRecord file, verifying both CRCs of each.

    Args:
        path: File path (or a path inside ``fs``).
        max_record_bytes: Largest record accepted; a larger length field is treated as
            corruption before any allocation.
        fs: Optional fsspec filesystem (default: the one ``path`` names).

    Raises:
        TFRecordError: Naming the file, record index and byte offset, on a CRC mismatch,
            an oversized length or a truncated record.
    """
    if fs is None:
        fs, path = url_to_fs(path)
    with fs.open(str(path), "rb") as f:
        yield from _records(f, str(path), max_record_bytes)


def _records(f: BinaryIO, name: str, max_record_bytes: int) -> Iterator[bytes]:
    index, offset = 0, 0
    while True:
        header = f.read(12)
        if not header:
            return
        where = f"{name}: record {index} (byte offset {offset})"
        if len(header) < 12:
            raise TFRecordError(f"{where}: truncated header ({len(header)} of 12 bytes)")
        length_bytes = header[:8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", header[8:])
        if masked_crc32c(length_bytes) != length_crc:
            raise TFRecordError(f"{where}: length CRC mismatch (corrupt header)")
        if length > max_record_bytes:
            raise TFRecordError(f"{where}: length {length} exceeds max_record_bytes={max_record_bytes}")
        data = f.read(length)
        if len(data) < length:
            raise TFRecordError(f"{where}: truncated data ({len(data)} of {length} bytes)")
        footer = f.read(4)
        if len(footer) < 4:
            raise TFRecordError(f"{where}: truncated data CRC ({len(footer)} of 4 bytes)")
        if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise TFRecordError(f"{where}: data CRC mismatch (corrupt payload)")
        yield data
        index += 1
        offset += 16 + length


def write_tfrecord(path: str | os.PathLike, examples_bytes: Iterable[bytes]) -> pathlib.Path:
    """Write serialised records to a TFRecord file (length, masked CRCs, payload).

    Returns:
        The file path.
    """
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        for data in examples_bytes:
            f.write(frame_record(bytes(data)))
    return path


def frame_record(data: bytes) -> bytes:
    """One TFRecord record: ``length``, its masked CRC, ``data``, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))
