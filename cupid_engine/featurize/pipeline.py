"""Featurise a dataset into a gradient store: register, plan, stream, write, finalize.

:func:`featurize` is the staged driver (TRAK's featurize -> finalize):

1. **Register** the source's episodes missing from the store catalog, one source unit at
   a time, after reading and checking their data (:mod:`~cupid_engine.featurize.register`).
2. **Create or reopen the run** with a :class:`~cupid_engine.store.RunConfig` carrying
   :meth:`Featurizer.describe`; a run produced under another config is refused.
3. **Stream** every shard without a completion marker (resume: finished shards are
   skipped, torn ones redone) on the caller's executor, in this process by default
   (:mod:`~cupid_engine.featurize.shards`).
4. **Finalize**: reduce the per-shard Gram partials (training split) in shard order.

The names of the steps' modules are importable from here too (``featurize_shard``,
``shard_units``, ...).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from cupid_engine.errors import ConfigError, DataError, LimitError, NotAStoreError, UserError, one_line
from cupid_engine.executor import Executor, InProcess
from cupid_engine.featurize.config import FeaturizeConfig
from cupid_engine.featurize.featurizer import Featurizer
from cupid_engine.featurize.register import (  # noqa: F401 - step 1, importable from here too
    Registration,
    apply_replacements,
    register,
    register_episodes,
    shard_units,
    source_name,
    unit_tables,
)
from cupid_engine.featurize.shards import (  # noqa: F401 - step 3, importable from here too
    ShardWorker,
    compute_shard_features,
    featurize_shard,
    featurize_shards,
)
from cupid_engine.policies.task import resolve_task
from cupid_engine.store import GradientStore, Run, RunConfig
from cupid_engine.store.undo import StoreUndo

log = logging.getLogger(__name__)

StoreLike = GradientStore | str | os.PathLike
"""An open store, or the path/URL of one (opened, or created when missing)."""

__all__ = ["ShardWorker", "featurize", "featurize_shard", "featurize_shards", "open_inputs", "prepare_run",
           "register_episodes", "run_config", "shard_units"]


# ----------------------------------------------------------------------------- inputs
def open_inputs(source: Any, store: StoreLike, policy: Any) -> tuple[Any, GradientStore, nn.Module, str | None]:
    """Resolve paths: ``(source, store, policy, policy_path)``.

    ``source`` may be a path/URL (``data.open_source``) or an ``EpisodeSource``; ``store`` a
    path (opened with mode ``"a"``) or a :class:`GradientStore`; ``policy`` a checkpoint
    directory (``policies.load_policy``) or an ``nn.Module`` (an engine :class:`Policy`
    or any module implementing the policy protocol, or the model of a separate task).
    """
    if isinstance(source, (str, os.PathLike)):
        from cupid_engine.data import open_source

        try:
            source = open_source(source)
        except UserError:
            raise
        except (pa.ArrowException, ValueError, KeyError, OSError, EOFError) as exc:
            raise DataError(f"cannot open the dataset ({type(exc).__name__}: {one_line(exc)})",
                            where=os.fspath(source), hint="check the path and the dataset's files") from exc
    policy_path = None
    if isinstance(policy, (str, os.PathLike)):
        from cupid_engine.policies import load_policy

        policy_path = str(policy)
        policy = load_policy(policy_path)
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be a torch module (a Policy or a policy-protocol module) or a checkpoint path, "
                        f"got {type(policy).__name__}")
    if not isinstance(store, GradientStore):  # last: a bad dataset or checkpoint creates no store
        store = GradientStore.open(store, mode="a")
    return source, store, policy, policy_path


def run_config(featurizer: Featurizer, config: FeaturizeConfig, *, stored: RunConfig | None = None) -> RunConfig:
    """The store :class:`RunConfig` of a featuriser run (an existing run's ``stored`` config
    keeps its recorded description when :meth:`Featurizer.matches` it)."""
    desc = featurizer.describe()
    if stored is not None and stored.featurizer != desc and featurizer.matches(stored.featurizer):
        desc = stored.featurizer
    return RunConfig(k=config.projection.k, dtype=config.dtype, featurizer=desc)


# ----------------------------------------------------------------------------- driver
def prepare_run(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    *, split: str | None = None,
) -> Run:
    """Steps 1-2: register missing episodes, create/reopen the run and size its arrays."""
    return _prepare(source, store, run_name, featurizer, config, split=split)[0]


def _prepare(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    *, split: str | None = None, replace: bool = False, undo: StoreUndo | None = None,
) -> tuple[Run, Registration]:
    store._check_writable()
    rc = run_config(featurizer, config)
    if run_name in store.runs():
        existing = store.run(run_name)
        rc = run_config(featurizer, config, stored=existing.config)
        existing.check_config(rc)  # refuse before touching the catalog
    check_bounds(config, rows=0)  # k alone can be hopeless: say so before reading any data
    reg = register(source, store, shard_size=config.shard_size, split=split, replace=replace)
    if not reg.selected:
        have = ", ".join(f"{k} {v}" for k, v in sorted(reg.splits.items())) or "no episodes at all"
        raise DataError(
            "the dataset has no episodes" + (f" of split {split!r}" if split else "") + f" (it has: {have})",
            where=source_name(source), hint="choose another --split or dataset (nothing was stored)",
        )
    if reg.added:
        log.info("registered %d new episodes", reg.added)
    apply_replacements(store, reg.replaced, undo)
    if reg.unchecked:
        log.warning("%d episode(s) were registered before content fingerprints: their content is not checked",
                    reg.unchecked)
    plan = store.shard_plan()
    check_bounds(config, rows=int(plan.rows[reg.shards].max()) if reg.shards else 0, store=store,
                 total_rows=plan.extent()[0], new_run=run_name not in store.runs())
    run = store.create_run(run_name, rc)
    run.sync()
    return run, reg


def _memory_limit() -> int:
    """Bytes of memory this process may use: physical memory, or a lower cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_bounds(
    config: FeaturizeConfig, *, rows: int, store: GradientStore | None = None, total_rows: int = 0,
    new_run: bool = False, memory: int | None = None,
) -> None:
    """Refuse a featurisation whose memory (or disk) need is out of reach, before allocating.

    Peak memory per shard (estimate): its features ``[rows, k]`` fp32 and their fp64
    copy for the Gram, the Gram and a partial ``[k, k]`` fp64 twice, and one batch of
    ``[batch_size, k]`` fp32 outputs twice (featuriser and copy).

    Args:
        config: The featurisation config (k, batch size, dtype).
        rows: Step rows of the largest shard to write.
        store: The store (its free disk is checked for a new run when local).
        total_rows: Step rows of the whole catalog (a new run's size on disk).
        new_run: The run does not exist yet.
        memory: Bytes available (default: physical memory or the cgroup limit).

    Raises:
        LimitError: with the estimate and what to change.
    """
    k, batch = config.projection.k, config.batch_size
    need = rows * k * (4 + 8) + 2 * k * k * 8 + 2 * batch * k * 4
    have = _memory_limit() if memory is None else memory
    if need > 0.8 * have:
        raise LimitError(
            f"featurising needs about {_gib(need)} of memory (k={k}: Gram {_gib(2 * k * k * 8)}; largest shard "
            f"{rows} steps: {_gib(rows * k * 12)}; batch {batch}: {_gib(2 * batch * k * 4)}), "
            f"more than 80% of the {_gib(have)} here", where="--k/--shard-size/--batch-size",
            hint="lower k, the shard size or the batch size (nothing was stored)",
        )
    if new_run and store is not None and store._loc.is_local and total_rows:
        from cupid_engine.store import quant

        disk = total_rows * k * quant.storage_numpy_dtype(config.dtype).itemsize
        free = shutil.disk_usage(store._loc.root).free
        if disk > free:
            raise LimitError(
                f"the run's features need about {_gib(disk)} on disk ({total_rows} steps x k={k} "
                f"{config.dtype}), only {_gib(free)} is free", where=store.url,
                hint="lower k, store a smaller dtype, or use a larger disk (nothing was stored)",
            )


class _NoDevice(ConfigError, RuntimeError):
    """The requested device is not there (a ``RuntimeError`` for callers that catch one)."""


def check_device(device: str | None) -> str | None:
    """``device`` validated (None passes through); a missing CUDA device raises with a hint."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device", where="--device",
                          hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _NoDevice(f"device {device!r} requested but torch sees no CUDA GPU (torch {torch.__version__})",
                        where="--device", hint="install a CUDA build of torch or featurise with device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}", where="--device")
    return str(dev)


def featurize(
    source: Any,
    store: StoreLike,
    run_name: str,
    *,
    policy: Any = None,
    config: FeaturizeConfig | None = None,
    split: str | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    device: str | None = None,
    overwrite: bool = False,
    replace: bool = False,
    task: Any = None,
    model: Any = None,
) -> Run:
    """Featurise ``source`` into run ``run_name`` of ``store`` and finalize it.

    Args:
        source: ``EpisodeSource`` or dataset path/URL.
        store: :class:`GradientStore` or store path/URL (created when missing).
        run_name: Run name (``runs/<name>``).
        policy: :class:`Policy` (or any module implementing the policy protocol) or
            checkpoint directory (required as a path when ``executor`` runs out of this
            process: its workers load it themselves). None when ``task`` is given.
        config: :class:`FeaturizeConfig` (default: tensorsketch, k = 4096, ``loss``).
        split: Only episodes of this split (None: all).
        progress: tqdm progress bar over episodes.
        executor: Where the shards are featurised (``cupid_engine.executor``; default
            in this process); ``cupid_engine.distributed.executor_for(workers, address)``
            gives Ray actors, locally or on a cluster.
        device: Where the policy runs (``cpu``, ``cuda``, ``cuda:1``; None: where it is).
            Not part of the run's config: features agree across devices to float32
            rounding, so a store may mix shards featurised on CPUs and GPUs.
        overwrite: Replace the gradient store at ``store`` (a local path) by a new one.
            The new store is built beside it and swapped in only on success; a folder
            that is not a gradient store is never deleted (refused).
        replace: Episodes the store holds may come with new content (same length): their
            fingerprints are updated and their shards featurised again in every run
            (other runs become incomplete until featurised again). Without it, changed
            content under a stored id is an error.
        task: A policy-protocol task (``policies.PolicyTask``: ``build_batch``,
            ``output``, ``supported_outputs``) for a model the engine did not write; the
            engine never needs its class (in-process only).
        model: The ``nn.Module`` whose parameters ``task`` attributes (default: the task
            itself when it is a module, else ``task.model``).

    Returns:
        The finalized :class:`Run` (not finalized, with a warning, when the store holds
        pending shards of episodes this source does not have).

    Raises:
        ValueError: the run exists with another config; bad episodes (named).
    """
    config = config or FeaturizeConfig()
    executor = executor or InProcess()
    device = check_device(device)
    if overwrite:
        return _featurize_overwrite(
            source, store, run_name, policy=policy, config=config, split=split, progress=progress,
            executor=executor, device=device, replace=replace, task=task, model=model,
        )
    undo_args = _store_state(store)
    if task is not None:
        if policy is not None:
            raise TypeError("pass either policy= or task= (+ model=), not both")
        policy, task = resolve_task(task=task, model=model)  # policy: the task's model
    source, store, policy_obj, policy_path = open_inputs(source, store, policy)
    # Until a shard is written, a failure puts the store back as it was (a store made
    # here is removed); once shards are written they are kept, and a rerun resumes.
    undo = StoreUndo(store, run=run_name, **undo_args)
    pending: list[int] = []
    try:
        check_bounds(config, rows=0)  # before the featuriser allocates anything of size k
        if device is not None:
            policy_obj = policy_obj.to(device)
        try:
            if task is None:
                featurizer = Featurizer.from_config(policy_obj, config)
            else:
                featurizer = Featurizer.from_config(None, config, task=task, model=policy_obj)
        except UserError:
            raise
        except ValueError as exc:  # the config does not fit this policy (track names, output, method/path)
            raise ConfigError(f"the featuriser config does not fit the policy ({one_line(exc)})",
                              where="--track/--output/--method", hint="see cupid-engine featurize --help") from None
        if not executor.in_process and policy_path is None:
            raise ValueError(
                f"{executor!r} needs policy as a checkpoint path (its workers load it themselves)"
                + ("; a task= object (a policy the engine did not write) is featurised in this process: "
                   "use workers=1 (the in-process executor)" if task is not None else "")
            )
        run, reg = _prepare(source, store, run_name, featurizer, config, split=split, replace=replace, undo=undo)
        covered = set(reg.shards)
        pending = [s for s in run.pending_shards() if s in covered]
        featurize_shards(source, store, run_name, pending, config=config, executor=executor,
                         featurizer=featurizer, policy_path=policy_path, device=device, progress=progress)
    except BaseException:
        written = _written(store, run_name, pending)
        if written:
            log.warning("run %r: %d shard(s) were written before the error and are kept; run the same "
                        "command again to resume", run_name, written)
            undo.release()
        else:
            undo.restore()
        raise
    undo.release()
    run = store.run(run_name)
    left = run.pending_shards()
    if left:
        others = _sources_of(store, left)
        log.warning(
            "run %r: %d shard(s) hold episodes of other datasets (%s; first shards: %s): not finalized until "
            "those are featurised into it too", run_name, len(left), others, left[:10],
        )
        return run
    if not pending and run.finalized_current():
        return run  # resumed a finished run: nothing was written, the Gram is current
    run.finalize()
    return run


def _featurize_overwrite(source: Any, store: StoreLike, run_name: str, **kwargs: Any) -> Run:
    """``featurize`` into a fresh store built beside ``store`` and swapped in on success."""
    from cupid_engine.store.location import _Location

    if isinstance(store, GradientStore) or not _Location(store).is_local:
        raise ConfigError("overwrite needs the store as a local folder path", where=str(store),
                          hint="remove the old store yourself, or featurise into a new path")
    loc = _Location(store)
    names = loc.listing()
    if names and not loc.is_store():
        raise NotAStoreError(
            f"{loc.url} is not a gradient store ({loc.describe(names)}); --overwrite only replaces a store",
            hint="choose a new or empty folder for the store (nothing there was changed)",
        )
    if not names:
        return featurize(source, loc.root, run_name, **kwargs)
    parent, base = os.path.split(loc.root.rstrip("/"))
    fresh, old = os.path.join(parent, f".{base}.new-{os.getpid()}"), os.path.join(parent, f".{base}.old-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        featurize(source, fresh, run_name, **kwargs)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    os.replace(loc.root, old)
    os.replace(fresh, loc.root)
    shutil.rmtree(old, ignore_errors=True)
    return GradientStore.open(loc.root, mode="a").run(run_name)


def _store_state(store: StoreLike) -> dict[str, bool]:
    """Whether ``featurize`` is about to create the store (and whether its folder exists)."""
    if isinstance(store, GradientStore):
        return {}
    from cupid_engine.store.location import _Location

    loc = _Location(store)
    if loc.exists():
        return {}
    return {"created": True, "had_folder": loc.listing() is not None}


def _written(store: GradientStore, run_name: str, pending: list[int]) -> int:
    """Shards of ``pending`` finished by now (0 when the run is gone or unreadable)."""
    if not pending:
        return 0
    try:
        left = set(store.run(run_name).pending_shards())
    except Exception:  # noqa: BLE001 - only deciding what to keep; the real error follows
        return 0
    return sum(1 for s in pending if s not in left)


def _sources_of(store: GradientStore, shards: list[int]) -> str:
    """The ``source`` names of the first episodes of some shards, for messages."""
    plan = store.shard_plan()
    ids = [plan.first_ids[s] for s in shards[:50]]
    names = sorted({str(x) for x in store.catalog_rows(ids, ["source"]).column(0).to_pylist() if x})
    return "sources " + ", ".join(repr(n) for n in names[:5]) if names else "episodes not in this dataset"
