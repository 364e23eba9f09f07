"""Configuration of one run of the gradient store.

A run (``runs/<name>/`` in the store) holds the features of one (policy checkpoint,
output function, projection, storage dtype) combination. :class:`RunConfig` is
recorded in the run group's attributes; reopening the run with a different config is
refused (STYLE §3) so that features produced under two settings are never mixed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cupid_engine.config import Config, check, field, names_tuple
from cupid_engine.constants import SPLITS

STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")
"""Storage dtypes of the ``steps`` array. bfloat16 is kept as raw uint16 bit patterns
(numpy has no bfloat16); int8 carries a per-row absmax scale in a ``scales`` array."""

COMPRESSORS = ("none", "blosc-lz4", "zstd")
"""Chunk compressors. Random-projection features compress ~1.1x, so "none" is default."""


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """What produced a run's features and how they are stored."""

    k: int = field(help="feature dimension (projection output size)")
    dtype: str = field("float32", help=f"storage dtype of per-step features: {STORAGE_DTYPES}")
    gram_splits: tuple[str, ...] = field(
        ("train",), help="splits whose step rows enter the fp64 Gram matrix"
    )
    featurizer: dict = field(
        default_factory=dict,
        help="JSON-safe description of the featuriser (checkpoint hash, output fn, projection)",
    )
    compressor: str = field("none", help=f"chunk compressor: {COMPRESSORS}")

    def __post_init__(self) -> None:
        check(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k > 0,
            f"k must be a positive int, got {self.k!r}",
        )
        check(self.dtype in STORAGE_DTYPES, f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        check(self.compressor in COMPRESSORS, f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        # Accept a list from callers (JSON style) but store a tuple so the config hashes.
        object.__setattr__(self, "gram_splits", names_tuple(self.gram_splits, "gram_splits"))
        for s in self.gram_splits:
            check(s in SPLITS, f"gram_splits entry {s!r} is not one of {SPLITS}")
        check(isinstance(self.featurizer, dict), "featurizer must be a dict")
        try:
            json.dumps(self.featurizer, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"featurizer must be JSON-safe: {exc}") from None

    def canonical(self) -> dict[str, Any]:
        """The config as it reads back from JSON (tuples become lists), for comparisons."""
        return json.loads(self.to_json())
