"""One run of the gradient store: per-step features, episode sums and the Gram matrix.

Layout of ``runs/<name>/`` (every array carries the crc32c checksum codec):

- ``steps``            ``[rows, K]`` storage dtype, chunks ``[chunk_rows, K]``
- ``scales``           ``[rows]`` float32 per-row int8 scales (int8 runs only)
- ``episodes``         ``[slots, K]`` float32 per-episode sums of the fp32 features,
                       chunks ``[episode_chunk_rows, K]``
- ``gram_parts``       ``[S, K, K]`` float64, one chunk per shard: X_s^T X_s over the rows
                       of the shard's episodes whose split is in ``gram_splits``
- ``gram_count_parts`` ``[S]`` int64, one chunk per shard: number of those rows
- ``done``             ``[S]`` uint8, one chunk per shard: the completion marker, written last
- ``gram``             ``[K, K]`` float64, written by :meth:`Run.finalize`

Cost note: a Gram partial is ``K * K * 8`` bytes per shard (128 MiB at K=4096), so
large-K runs want large shards; shards with no Gram rows (e.g. only rollouts) store
nothing there.

Every shard owns whole chunks of every array (the catalog aligns shard regions to chunk
boundaries) and a shard is always written as complete chunks, so concurrent writers of
disjoint shards never share a chunk, and rewriting a shard never reads (possibly torn)
old data. A shard without its marker is simply written again: that is the resume story.

Chunks are written and read through ``chunks.py``: directly (a fast path, byte-identical
to zarr's encoding) for local uncompressed runs, through zarr's codecs otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import wait
from typing import Any

import numpy as np
import zarr

from cupid_engine.constants import SCHEMA_VERSION
from cupid_engine.errors import StoreError
from cupid_engine.store import quant
from cupid_engine.store.chunks import _THREADS, _codecs, _direct_dir, _pool, _read_chunk_file, _write_chunk_file
from cupid_engine.store.config import RunConfig
from cupid_engine.store.errors import (
    CorruptChunk,
    CorruptChunkError,
    RunIncompleteError,
    SchemaVersionError,
    VerifyReport,
)

log = logging.getLogger(__name__)


_PER_SHARD = ("gram_parts", "gram_count_parts", "done")


def _to_numpy(x: Any) -> np.ndarray:
    """A float32 C-contiguous numpy view/copy of a numpy array or CPU torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        if getattr(x, "device", None) is not None and str(x.device) != "cpu":
            raise ValueError(f"step_features must be on the CPU, got device {x.device}")
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy cannot hold bf16
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"step_features must be floating point, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


class Run:
    """Features of one featuriser configuration, written shard by shard.

    Obtain with :meth:`GradientStore.create_run` or :meth:`GradientStore.run`: the store
    makes its runs (``gradient_store`` imports this module, never the reverse), so the
    ``store`` annotation names its type without importing it.
    """

    def __init__(self, store: "GradientStore", name: str, group: zarr.Group) -> None:  # noqa: F821
        self.store = store
        self.name = name
        self._group = group
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"run {name!r} has schema version {attrs.get('schema_version')}, expected {SCHEMA_VERSION}"
            )
        self.config: RunConfig = RunConfig.from_dict(attrs["config"])
        # Open every array once (one listing) so the first write/read pays no metadata I/O.
        self._arrays: dict[str, zarr.Array] = dict(group.arrays())

    # ------------------------------------------------------------------ basics
    @property
    def k(self) -> int:
        return self.config.k

    @property
    def dtype(self) -> str:
        return self.config.dtype

    def check_config(self, config: RunConfig) -> None:
        """Raise ``ValueError`` showing the differing keys unless ``config`` equals this run's."""
        have, want = self.config.canonical(), config.canonical()
        if have == want:
            return
        diffs = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
        lines = "; ".join(f"{k}: stored {a!r} != requested {b!r}" for k, (a, b) in diffs.items())
        raise StoreError(f"run {self.name!r} exists with a different config ({lines})", where=self.store.url,
                         hint="use another run name (nothing was stored)")

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def _array_names(self) -> list[str]:
        names = ["steps", "episodes", "gram_parts", "gram_count_parts", "done", "gram"]
        if self.dtype == "int8":
            names.insert(1, "scales")
        return names

    def _ensure_arrays(self) -> None:
        """Create missing arrays, sized for the current catalog (idempotent)."""
        idx = self.store._index(refresh=True)
        k, c = self.k, _codecs(self.config.compressor)
        cr, ecr = self.store.chunk_rows, self.store.episode_chunk_rows
        specs = {
            "steps": ((idx.total_rows, k), (cr, k), quant.storage_numpy_dtype(self.dtype), c),
            "scales": ((idx.total_rows,), (cr,), np.float32, c),
            "episodes": ((idx.total_slots, k), (ecr, k), np.float32, c),
            "gram_parts": ((idx.num_shards, k, k), (1, k, k), np.float64, c),
            "gram_count_parts": ((idx.num_shards,), (1,), np.int64, _codecs("none")),
            "done": ((idx.num_shards,), (1,), np.uint8, _codecs("none")),
            "gram": ((k, k), (k, k), np.float64, c),
        }
        existing = set(self._group.array_keys())
        for name in self._array_names():
            if name in existing:
                continue
            shape, chunks, dtype, codecs = specs[name]
            self._group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=codecs, fill_value=0
            )
        self._arrays.clear()

    @property
    def num_shards(self) -> int:
        """Shards this run's arrays are sized for (may lag the catalog until :meth:`sync`)."""
        return int(self._array("done").shape[0])

    def sync(self) -> None:
        """Grow the run's arrays to the current catalog (driver side, not concurrently).

        Existing chunks are untouched: the catalog never moves rows.
        """
        self.store._check_writable()
        idx = self.store._index(refresh=True)
        want = {
            "steps": (idx.total_rows, self.k),
            "scales": (idx.total_rows,),
            "episodes": (idx.total_slots, self.k),
            "gram_parts": (idx.num_shards, self.k, self.k),
            "gram_count_parts": (idx.num_shards,),
            "done": (idx.num_shards,),
        }
        for name, shape in want.items():
            if name not in self._array_names():
                continue
            a = self._array(name)
            if tuple(a.shape) != shape:
                if shape[0] < a.shape[0]:
                    raise RuntimeError(f"run {self.name!r}: catalog shrank below array {name!r}; store is inconsistent")
                a.resize(shape)
        self._arrays.clear()

    # ------------------------------------------------------------------ state
    def _done_flags(self) -> np.ndarray:
        return self._read_rows("done", 0, self.num_shards).astype(bool)

    def shard_done(self, shard_id: int) -> bool:
        """Whether the shard's completion marker exists."""
        if not 0 <= shard_id < self.num_shards:
            return False
        return bool(self._read_rows("done", shard_id, shard_id + 1)[0])

    def pending_shards(self) -> list[int]:
        """Catalog shards without a completion marker (including ones not yet synced)."""
        idx = self.store._index(refresh=True)
        done = self._done_flags()
        return [s for s in range(idx.num_shards) if s >= len(done) or not done[s]]

    def done_marker_path(self, shard_id: int) -> str:
        """Path of a shard's completion marker relative to the store root."""
        key = self._array("done").metadata.encode_chunk_key((int(shard_id),))
        return f"runs/{self.name}/done/{key}"

    def invalidate_shards(self, shards: Sequence[int]) -> None:
        """Clear the completion markers of ``shards`` (their episodes changed) and the finalized state.

        The shards' features are then written again by the next featurisation; until
        then the run is incomplete and reads of those episodes raise.
        """
        self.store._check_writable()
        for s in shards:
            if self.shard_done(int(s)):
                self._put("done", int(s), [0], atomic=True)
        if self._group.attrs.get("finalized") is not None:
            del self._group.attrs["finalized"]

    def is_complete(self) -> bool:
        """True when every shard of the catalog is written."""
        return not self.pending_shards()

    # ------------------------------------------------------------------ writing
    def write_shard(
        self,
        shard_id: int,
        episode_ids: Sequence[str],
        step_features: Any,
        lengths: Sequence[int] | np.ndarray,
    ) -> None:
        """Write one shard; everything is validated before the first byte is written.

        Args:
            shard_id: a shard of the catalog's plan.
            episode_ids: ``[n]`` the shard's episodes, in catalog order.
            step_features: ``[rows, K]`` float32 numpy array or CPU torch tensor, the
                concatenated steps of those episodes (``rows = sum(lengths)``).
            lengths: ``[n]`` steps per episode, equal to the catalog's.

        Raises:
            ValueError: plan mismatch, wrong K, empty episode, NaN/Inf (episode and step named).
            RuntimeError: the shard lies beyond this run's arrays (call :meth:`sync`).
        """
        self.store._check_writable()
        if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)):
            raise TypeError(f"shard_id must be an int, got {shard_id!r}")
        shard_id = int(shard_id)
        idx = self.store._index()
        if shard_id >= idx.num_shards:
            idx = self.store._index(refresh=True)
        if not 0 <= shard_id < idx.num_shards:
            raise ValueError(f"shard {shard_id} is not in the catalog's shard plan (0..{idx.num_shards - 1})")
        # Only this shard's catalog rows are read (one row group), never the whole catalog.
        plan_rows = idx.read(*idx.shard_range(shard_id), columns=["episode_id", "length", "split"])
        plan_ids = plan_rows.column("episode_id").to_pylist()
        plan_len = np.asarray(plan_rows.column("length").to_numpy(), dtype=np.int64)
        plan_split = np.asarray(plan_rows.column("split").to_pylist(), dtype=object)
        row0, slot0 = int(idx.plan.row0[shard_id]), int(idx.plan.slot0[shard_id])
        ids = [str(e) for e in episode_ids]
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if ids != plan_ids:
            extra = [e for e in ids if e not in set(plan_ids)]
            missing = [e for e in plan_ids if e not in set(ids)]
            raise ValueError(
                f"shard {shard_id}: episode_ids do not match the shard plan "
                f"(plan has {len(plan_ids)} episodes starting {plan_ids[:3]}; not in plan: {extra[:5]}; "
                f"missing: {missing[:5]}; order must be catalog order)"
            )
        for eid, n in zip(ids, lens):
            if n <= 0:
                raise ValueError(f"shard {shard_id}: episode {eid!r} is empty (length {n})")
        if len(lens) != len(ids) or not np.array_equal(lens, plan_len):
            bad = [(e, int(x), int(y)) for e, x, y in zip(ids, lens, plan_len) if x != y]
            raise ValueError(
                f"shard {shard_id}: lengths do not match the catalog "
                f"(got {len(lens)} lengths for {len(ids)} episodes; (episode, given, catalog): {bad[:5]})"
            )
        x = _to_numpy(step_features)
        rows = int(lens.sum())
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"shard {shard_id}: step_features has shape {x.shape}, expected [{rows}, {self.k}] (k={self.k})")
        if x.shape[0] != rows:
            raise ValueError(f"shard {shard_id}: step_features has {x.shape[0]} rows, lengths sum to {rows}")
        end_row = row0 + int(idx.plan.rows[shard_id])
        if shard_id >= self.num_shards or end_row > self._array("steps").shape[0]:
            # The driver may have synced since this handle opened the arrays: look again.
            self._arrays = dict(self._group.arrays())
        if shard_id >= self.num_shards or end_row > self._array("steps").shape[0]:
            raise RuntimeError(
                f"shard {shard_id} lies beyond run {self.name!r}'s arrays (episodes added after the run "
                f"was created): call run.sync() on the driver first"
            )
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        sums64 = self._episode_sums(x, starts, lens)
        # An fp64 sum of fp32 values cannot overflow, so a column sum is finite exactly
        # when every value in it is: the sums double as the NaN/Inf check (no extra pass).
        finite = np.isfinite(sums64).all(axis=1)
        if not finite.all():
            e = int(np.argmin(finite))
            block = x[starts[e] : starts[e] + lens[e]]
            step = int(np.argmin(np.isfinite(block).all(axis=1)))
            col = int(np.argmin(np.isfinite(block[step])))
            raise ValueError(
                f"shard {shard_id}: episode {ids[e]!r} step {step} has a non-finite feature "
                f"({block[step, col]} at column {col}); nothing of the shard was written"
            )
        sums = sums64.astype(np.float32)

        # --- everything validated: compute, then write (marker last) ---
        gram_mask = np.repeat(np.isin(plan_split, list(self.config.gram_splits)), lens)
        gram_count = int(gram_mask.sum())

        if self.shard_done(shard_id):
            # Clear the marker first: a crash during a rewrite must not leave it standing.
            self._put("done", shard_id, [0], atomic=True)
        self._write_steps(row0, x)
        self._put("episodes", slot0, sums)
        if gram_count:
            xs = x if gram_count == rows else x[gram_mask]
            x64 = xs.astype(np.float64)
            self._put("gram_parts", shard_id, (x64.T @ x64)[None])
        # A shard with no Gram rows keeps the fill value (zeros) and writes nothing there.
        self._put("gram_count_parts", shard_id, [gram_count])
        # Marker last, and atomically (rename), so it is either absent or valid.
        self._put("done", shard_id, [1], atomic=True)

    @staticmethod
    def _episode_sums(x: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``[n, K]`` float64 per-episode sums of ``x`` ``[rows, K]``, episodes in parallel.

        Each episode is reduced on its own, in row order, so the result does not depend
        on how episodes are spread over threads.
        """
        out = np.empty((len(lens), x.shape[1]), np.float64)

        def part(i0: int, i1: int) -> None:
            for i in range(i0, i1):
                x[starts[i] : starts[i] + lens[i]].sum(axis=0, dtype=np.float64, out=out[i])

        n = len(lens)
        groups = min(n, _THREADS)
        bounds = [n * g // groups for g in range(groups + 1)]
        if groups <= 1 or x.shape[0] * x.shape[1] < (1 << 20):
            part(0, n)
        else:
            futures = [_pool().submit(part, bounds[g], bounds[g + 1]) for g in range(groups)]
            wait(futures)
            for fut in futures:
                fut.result()
        return out

    def _write_steps(self, row0: int, x: np.ndarray) -> None:
        """Encode ``x`` ``[R, K]`` fp32 chunk by chunk and write ``steps`` (+ ``scales``).

        Encoding is row-wise, so encoding per chunk gives the same bytes as encoding the
        whole shard, while chunks are cast, checksummed and written in parallel.
        """
        steps = self._array("steps")
        scales = self._array("scales") if self.dtype == "int8" else None
        cr = steps.chunks[0]
        n = x.shape[0]
        direct = _direct_dir(steps)
        direct_scales = _direct_dir(scales) if scales is not None else None

        def one(c0: int) -> None:
            data, sc = quant.encode(x[c0 : c0 + cr], self.dtype)
            self._write_rows(steps, row0 + c0, data, direct)
            if scales is not None:
                self._write_rows(scales, row0 + c0, sc, direct_scales)

        starts = range(0, n, cr)
        if len(starts) == 1:
            one(0)
        else:
            futures = [_pool().submit(one, c0) for c0 in starts]
            wait(futures)  # let every chunk finish before an error propagates
            for fut in futures:
                fut.result()

    @staticmethod
    def _write_rows(array: zarr.Array, start: int, values: np.ndarray, direct: str | None, *, atomic: bool = False) -> None:
        """Write ``values`` at row ``start`` (a chunk boundary) as whole chunks only.

        The tail is zero-padded (zero is every array's fill value) so zarr never reads
        the old chunk, which a killed writer may have left torn. ``direct`` is
        :func:`_direct_dir` of the array (None: let zarr encode).
        """
        chunk = array.chunks[0]
        n = values.shape[0]
        if direct is not None:
            zeros = (0,) * (array.ndim - 1)
            for c0 in range(0, n, chunk):
                part = values[c0 : c0 + chunk]
                if part.shape[0] < chunk:  # zarr stores every chunk, edge ones too, at full shape
                    pad = np.zeros((chunk,) + part.shape[1:], part.dtype)
                    pad[: part.shape[0]] = part
                    part = pad
                key = array.metadata.encode_chunk_key(((start + c0) // chunk,) + zeros)
                _write_chunk_file(os.path.join(direct, key), part, atomic=atomic)
            return
        body = (n // chunk) * chunk
        if body:
            array[start : start + body] = values[:body]
        if body < n:
            end = min(start + body + chunk, array.shape[0])
            tail = np.zeros((end - start - body,) + values.shape[1:], dtype=values.dtype)
            tail[: n - body] = values[body:]
            array[start + body : end] = tail

    def _put(self, name: str, start: int, values: np.ndarray, *, atomic: bool = False) -> None:
        array = self._array(name)
        self._write_rows(array, start, np.asarray(values, dtype=array.dtype), _direct_dir(array), atomic=atomic)

    # ------------------------------------------------------------------ finalize
    def finalize(self, *, allow_partial: bool = False) -> np.ndarray:
        """Reduce the per-shard Gram partials, in shard order, into ``gram``.

        Summing in a fixed order makes the result identical however shards were
        scheduled across workers.

        Args:
            allow_partial: reduce over the finished shards only instead of raising.

        Returns:
            ``[K, K]`` float64 Gram matrix.
        """
        self.store._check_writable()
        pending = self.pending_shards()
        if pending and not allow_partial:
            raise RuntimeError(
                f"run {self.name!r}: {len(pending)} shard(s) not written yet (first: {pending[:10]}); "
                "write them or pass allow_partial=True"
            )
        done = self._done_flags()
        parts = self._array("gram_parts")
        counts = self._read(self._array("gram_count_parts"), slice(None), "gram_count_parts", None)
        gram = np.zeros((self.k, self.k), np.float64)
        count = 0
        used = []
        for s in range(len(done)):
            if not done[s]:
                continue
            used.append(s)
            count += int(counts[s])
            if counts[s]:
                gram += self._read(parts, s, "gram_parts", lambda s=s: self.store._index().episodes_in_shard(s))
        self._array("gram")[...] = gram
        self._group.attrs["finalized"] = {
            "gram_count": count,
            "num_shards": len(done),
            "shards_used": len(used),
            "partial": bool(pending),
        }
        return gram

    def finalized_current(self) -> bool:
        """Whether the Gram covers every shard of the current catalog (finalized, not partial)."""
        fin = self._group.attrs.get("finalized")
        if not fin or fin.get("partial"):
            return False
        shards = self.store._index(refresh=True).num_shards
        return int(fin.get("num_shards", -1)) == shards and int(fin.get("shards_used", -1)) == shards

    def _finalized(self) -> dict:
        fin = self._group.attrs.get("finalized")
        if not fin:
            pending = self.pending_shards()
            state = f"{len(pending)} shard(s) not featurised yet" if pending else "its Gram matrix is not reduced yet"
            raise StoreError(
                f"run {self.name!r} is not finalized ({state})", where=self.store.url,
                hint=f"featurise the missing episodes into it (cupid-engine featurize --run {self.name} ...), "
                     "which finalizes it",
            )
        return dict(fin)

    def gram(self) -> np.ndarray:
        """``[K, K]`` float64 Gram matrix written by :meth:`finalize`."""
        self._finalized()
        return np.asarray(self._read(self._array("gram"), slice(None), "gram", None), dtype=np.float64)

    @property
    def gram_count(self) -> int:
        """Number of step rows summed into :meth:`gram`."""
        return int(self._finalized()["gram_count"])

    # ------------------------------------------------------------------ reading
    def _read(self, array: zarr.Array, sel: Any, what: str, episode_ids: Any) -> np.ndarray:
        """``array[sel]``; ``episode_ids`` (a list, or a callable giving it only on error) names a bad chunk."""
        try:
            return array[sel]
        except ValueError as exc:
            if callable(episode_ids):
                episode_ids = episode_ids()
            who = f"episode(s) {episode_ids[:10]}" if episode_ids else "run metadata"
            raise CorruptChunkError(
                f"run {self.name!r} array {what!r}: corrupt chunk covering {who}: {exc}"
            ) from exc

    def _check_written(self, positions: np.ndarray) -> None:
        idx = self.store._index()
        of_shard = idx.plan.shard_of(positions)
        shards = np.unique(of_shard)
        n = self.num_shards
        if len(shards) <= 8:  # one tiny chunk per shard: read only those
            missing = [int(s) for s in shards if s >= n or not self.shard_done(int(s))]
        else:
            done = self._done_flags()
            missing = [int(s) for s in shards if s >= len(done) or not done[s]]
        if missing:
            bad = np.asarray(positions)[np.isin(of_shard, missing)][:10]
            eids = idx.take(bad, ["episode_id"]).column(0).to_pylist()
            raise RunIncompleteError(
                f"run {self.name!r}: episode(s) {eids[:10]} are in shard(s) not featurised yet {missing[:10]}",
                where=self.store.url,
                hint=f"featurise their dataset into the run (cupid-engine featurize --run {self.name})",
            )

    def _positions(self, ids: Sequence[str] | None) -> np.ndarray:
        if ids is None:
            return np.arange(self.store._index().num_rows)
        return self.store.positions(ids)

    def step_features(self, episode_id: str) -> np.ndarray:
        """``[T, K]`` float32 (dequantised) features of one episode's steps."""
        return self.step_features_at(int(self._positions([episode_id])[0]))

    def step_features_at(self, position: int) -> np.ndarray:
        """``[T, K]`` float32 features of the episode at catalog row ``position``."""
        pos = np.asarray([position], np.int64)
        self._check_written(pos)
        idx = self.store._index()
        r0 = int(idx.int_column("row_offset")[position])
        return self._read_steps(r0, r0 + int(idx.int_column("length")[position]))

    def _read_steps(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``steps`` as ``[r1 - r0, K]`` float32, checksums verified."""
        data = self._read_rows("steps", r0, r1)
        scales = self._read_rows("scales", r0, r1) if self.dtype == "int8" else None
        return quant.decode(data, self.dtype, scales)

    def _read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of a row-chunked array in its storage dtype.

        Local uncompressed arrays are read chunk file by chunk file (checksum checked
        here, chunks in parallel); others go through zarr. A bad chunk raises
        :class:`CorruptChunkError` naming the episodes whose rows it holds.
        """
        array = self._array(name)
        direct = _direct_dir(array)
        if direct is None:
            try:
                return array[r0:r1]
            except ValueError as exc:
                raise self._corrupt(name, r0, r1, exc) from exc
        cr = array.chunks[0]
        tail = tuple(array.shape[1:])
        out = np.empty((r1 - r0,) + tail, np.dtype(array.dtype))

        def one(c: int) -> None:
            a, b = max(r0, c * cr), min(r1, (c + 1) * cr)
            key = array.metadata.encode_chunk_key((c,) + (0,) * len(tail))
            try:
                chunk = _read_chunk_file(os.path.join(direct, key), (cr,) + tail, out.dtype)
            except ValueError as exc:
                raise self._corrupt(name, c * cr, (c + 1) * cr, exc) from exc
            if chunk is None:  # never written: zarr's fill value
                out[a - r0 : b - r0] = 0
            else:
                out[a - r0 : b - r0] = chunk[a - c * cr : b - c * cr]

        chunks = range(r0 // cr, -(-r1 // cr)) if r1 > r0 else range(0)
        if len(chunks) <= 1:
            for c in chunks:
                one(c)
        else:
            futures = [_pool().submit(one, c) for c in chunks]
            wait(futures)
            for fut in futures:
                fut.result()
        return out

    def _corrupt(self, name: str, r0: int, r1: int, exc: Exception) -> CorruptChunkError:
        try:
            eids = self.store._index().episodes_in_rows(r0, r1)
        except Exception:  # noqa: BLE001 - naming the episodes is best effort; keep the real error
            eids = []
        return CorruptChunkError(f"run {self.name!r} array {name!r}: corrupt chunk covering episode(s) {eids[:10]}: {exc}")

    def iter_shard_steps(self, shards: Sequence[int] | None = None) -> Iterator[tuple[int, list[str], np.ndarray, np.ndarray]]:
        """Stream step features shard by shard (the read-side mirror of :meth:`write_shard`).

        Args:
            shards: shard ids to read (default: every shard of the catalog, in order).

        Yields:
            ``(shard_id, episode_ids [n], lengths [n], features [rows, K] float32)``.
        """
        idx = self.store._index()
        for s in range(idx.num_shards) if shards is None else shards:
            s = int(s)
            a, b = idx.shard_range(s)
            self._check_written(np.arange(a, b))
            ids, lengths = self.store.shard_episodes(s)
            r0 = int(idx.plan.row0[s])
            yield s, ids, lengths, self._read_steps(r0, r0 + int(idx.plan.rows[s]))

    def episode_features(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """``[E, K]`` float32 per-episode sums; catalog order when ``ids`` is None."""
        return self.episode_features_at(self._positions(ids))

    def episode_features_at(self, positions: np.ndarray) -> np.ndarray:
        """``[E, K]`` float32 per-episode sums of the episodes at catalog rows ``positions``."""
        pos = np.asarray(positions, np.int64)
        if len(pos) == 0:
            return np.zeros((0, self.k), np.float32)
        self._check_written(pos)
        idx = self.store._index()
        slots = idx.plan.slots(pos)
        arr = self._array("episodes")

        def names() -> list[str]:
            return idx.take(pos[:10], ["episode_id"]).column(0).to_pylist()

        lo, hi = int(slots.min()), int(slots.max()) + 1
        if hi - lo <= 4 * len(slots):
            # Dense enough: one contiguous read beats a gather of scattered rows.
            block = self._read(arr, slice(lo, hi), "episodes", names)
            return np.ascontiguousarray(block[slots - lo])
        order = np.argsort(slots, kind="stable")
        got = self._oindex(arr, slots[order], names)
        out = np.empty((len(pos), self.k), np.float32)
        out[order] = got
        return out

    def _oindex(self, arr: zarr.Array, rows: np.ndarray, eids: Any) -> np.ndarray:
        try:
            return arr.oindex[rows, :]
        except ValueError as exc:
            eids = eids() if callable(eids) else eids
            raise CorruptChunkError(f"run {self.name!r} array 'episodes': corrupt chunk covering episode(s) {eids[:10]}: {exc}") from exc

    def iter_episode_features(self, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Stream per-episode sums in catalog order.

        Yields:
            ``(episode_ids [b], features [b, K] float32)`` with ``b <= block``.
        """
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        idx = self.store._index()
        for a in range(0, idx.num_rows, block):
            b = min(idx.num_rows, a + block)
            yield idx.ids(a, b), self.episode_features_at(np.arange(a, b))

    # ------------------------------------------------------------------ checks
    def _verify_into(self, report: VerifyReport) -> None:
        idx = self.store._index(refresh=True)
        for name in self._array_names():
            arr = self._array(name)
            chunk = arr.chunks[0]
            n = arr.shape[0]
            for c in range(-(-n // chunk)):
                r0, r1 = c * chunk, min(n, (c + 1) * chunk)
                report.chunks_checked += 1
                try:
                    arr[r0:r1]
                except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
                    if name in ("steps", "scales"):
                        eids = idx.episodes_in_rows(r0, r1)
                    elif name == "episodes":
                        eids = idx.episodes_in_slots(r0, r1)
                    elif name in _PER_SHARD:
                        eids = idx.episodes_in_shard(c)
                    else:
                        eids = []
                    report.problems.append(CorruptChunk(self.name, name, c, tuple(eids), str(exc)))

    def info(self) -> dict[str, Any]:
        """Summary: k, dtype, completion, bytes stored."""
        idx = self.store._index()
        done = int(self._done_flags().sum())
        steps = self._array("steps")
        nbytes = int(steps.shape[0]) * self.k * quant.storage_numpy_dtype(self.dtype).itemsize
        return {
            "name": self.name,
            "k": self.k,
            "dtype": self.dtype,
            "compressor": self.config.compressor,
            "gram_splits": list(self.config.gram_splits),
            "shards_done": done,
            "shards_total": idx.num_shards,
            "complete": done == idx.num_shards,
            # Finalized means the Gram covers every shard the catalog has now: a catalog
            # that grew since (or a partial reduce) is reported as not finalized.
            "finalized": done == idx.num_shards and self.finalized_current(),
            "steps_bytes": nbytes,
            "steps_bytes_stored": int(steps.nbytes_stored()),
        }

    def __repr__(self) -> str:
        return f"Run({self.name!r}, k={self.k}, dtype={self.dtype!r})"
