"""What scorers read from a gradient store, as typing protocols (no behaviour here).

:class:`~cupid_engine.store.GradientStore` (and the chunk-caching wrapper of
``scorers._cache``) satisfies :class:`StoreReader`; so does the in-memory
``scorers.arrays.ArrayStore`` that tests and notebooks build from arrays. A scorer asks
for nothing else: the catalog, and per run the Gram, step features and episode sums.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: reading this module imports neither
    import numpy as np
    import pyarrow as pa

__all__ = ["RunReader", "StoreReader"]


@runtime_checkable
class RunReader(Protocol):
    """One run's features, as scorers read them.

    Attributes:
        k: Feature width ``K``.
        config: The run's config (``gram_splits``, ``featurizer`` description).
        gram_count: Step rows summed into :meth:`gram`.
    """

    @property
    def k(self) -> int: ...

    @property
    def config(self) -> Any: ...

    @property
    def gram_count(self) -> int: ...

    def gram(self) -> np.ndarray:
        """``[K, K]`` float64 sum of the outer products of the Gram splits' step features."""
        ...

    def step_features(self, episode_id: str) -> np.ndarray:
        """``[T, K]`` step features of one episode."""
        ...

    def episode_features(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """``[E, K]`` per-episode sums of step features (catalog order when ``ids`` is None)."""
        ...

    def iter_episode_features(self, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(episode_ids [b], [b, K])`` blocks of per-episode sums, in catalog order."""
        ...


@runtime_checkable
class StoreReader(Protocol):
    """A gradient store as scorers read it: its catalog and its runs."""

    def catalog(self) -> pa.Table:
        """The episode catalog (``episode_id``, ``split``, ``length``, labels...)."""
        ...

    def run(self, name: str) -> RunReader:
        """The run called ``name``."""
        ...
