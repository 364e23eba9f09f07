"""The in-memory episode: the unit every reader yields and every writer consumes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass
class Episode:
    """One demonstration or rollout.

    Attributes:
        episode_id: Unique string id within a dataset/store. Data, never a path.
        observations: ``observation key -> [T, d_key]`` float32 arrays (keys without the
            ``observation.`` prefix).
        actions: ``[T, A]`` float32 actions.
        split: One of ``constants.SPLITS`` (train, holdout, validation, rollout, target).
        source: Free-form origin (dataset name, ``sim:lift``, ...).
        task: Task name.
        success: Whether the episode succeeded (None if unknown).
        return_: Scalar return (None if unknown).
        tier: Quality tier (better/okay/worse) if known, else None.
        metadata: JSON-serialisable free metadata (strategy parameters, env knobs ...).
    """

    episode_id: str
    observations: dict[str, np.ndarray]
    actions: np.ndarray
    split: str = "train"
    source: str = ""
    task: str = ""
    success: bool | None = None
    return_: float | None = None
    tier: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.episode_id, str) or not self.episode_id:
            raise ValueError(f"episode_id must be a non-empty string, got {self.episode_id!r}")
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2:
            raise ValueError(
                f"episode {self.episode_id!r}: field 'action' must be [T, A], got shape {self.actions.shape}"
            )
        T = self.actions.shape[0]
        obs = {}
        for key, value in self.observations.items():
            arr = np.asarray(value, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or arr.shape[0] != T:
                raise ValueError(
                    f"episode {self.episode_id!r}: field 'observation.{key}' has shape {arr.shape}, "
                    f"expected [{T}, d] to match 'action'"
                )
            obs[key] = arr
        self.observations = obs
        if self.return_ is not None and not math.isfinite(float(self.return_)):
            raise ValueError(f"episode {self.episode_id!r}: field 'return' is not finite")

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    def obs_vector(self, keys: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """Concatenate observation keys (sorted unless given) into ``[T, D]`` float32."""
        keys = sorted(self.observations) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.observations]
        if missing:
            raise KeyError(f"episode {self.episode_id!r}: missing observation keys {missing}")
        if not keys:
            return np.zeros((self.length, 0), np.float32)
        return np.concatenate([self.observations[k] for k in keys], axis=1)
