"""Policy samples: observation windows and action chunks cut from episodes.

A *sample* (DESIGN §1) is one policy query: the observation window that ends at step
``t`` and the action chunk that starts at ``t``. We follow the diffusion_policy padding
convention so every step of every episode yields exactly one sample:

* the observation window ``obs[t - n_obs + 1 .. t]`` repeats the first observation
  where it runs off the start of the episode;
* the action chunk ``action[t .. t + horizon - 1]`` repeats the last action where it
  runs off the end.

Camera frames (``Episode.images``) follow the same window convention through
:func:`image_windows`, kept ``uint8`` so an image policy converts them on its device.

Samples carry ``episode_key`` (a 31-bit hash of the episode id, stable across processes
and machines because it uses hashlib, never Python's salted ``hash``) and ``step``: the
pair identifies a sample independently of batch order, which is what the seeded noise of
the ``square`` output function is derived from. Keys are 31 bits, so in a dataset of ~1e5+
episodes two ids may share a key; the only effect is that their samples at equal steps
draw the same (ε, t), a correlation too weak to matter for an expectation estimate.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cupid_engine.data.episode import Episode


def episode_key(episode_id: str) -> int:
    """Stable 31-bit key of an episode id: the first 4 bytes of its sha256, masked.

    Args:
        episode_id: The episode's string id.

    Returns:
        An int in ``[0, 2**31)``, identical in every process and on every machine.
    """
    digest = hashlib.sha256(episode_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class SampleSet:
    """All samples of a list of episodes, as CPU tensors (unnormalised).

    Attributes:
        obs: ``[N, n_obs, D]`` float32 observation windows.
        action: ``[N, horizon, A]`` float32 action chunks.
        episode_index: ``[N]`` int64 position of each sample's episode in ``episode_ids``.
        episode_key: ``[N]`` int64 31-bit hash of each sample's episode id.
        step: ``[N]`` int64 step of each sample inside its episode.
        episode_ids: Ids of the episodes, in input order.
        obs_keys: Observation keys concatenated (in this order) into ``D``.
    """

    obs: torch.Tensor
    action: torch.Tensor
    episode_index: torch.Tensor
    episode_key: torch.Tensor
    step: torch.Tensor
    episode_ids: list[str]
    obs_keys: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_obs_steps(self) -> int:
        return int(self.obs.shape[1])

    @property
    def horizon(self) -> int:
        return int(self.action.shape[1])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[2])

    @property
    def action_dim(self) -> int:
        return int(self.action.shape[2])

    def batch(self, indices: torch.Tensor | Sequence[int] | slice | None = None) -> dict[str, torch.Tensor]:
        """Raw (unnormalised) batch dict of the selected samples.

        Args:
            indices: Sample indices (or a slice); all samples when None.

        Returns:
            ``{"obs": [B, n_obs, D], "action": [B, H, A], "episode_key": [B], "step": [B]}``.
        """
        if indices is None:
            indices = slice(None)
        elif not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        return {
            "obs": self.obs[indices],
            "action": self.action[indices],
            "episode_key": self.episode_key[indices],
            "step": self.step[indices],
        }

    def subset(self, indices: torch.Tensor | Sequence[int]) -> SampleSet:
        """A new SampleSet with the selected samples (episode ids list is kept whole)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return SampleSet(
            obs=self.obs[idx],
            action=self.action[idx],
            episode_index=self.episode_index[idx],
            episode_key=self.episode_key[idx],
            step=self.step[idx],
            episode_ids=list(self.episode_ids),
            obs_keys=self.obs_keys,
        )

    def episode_slices(self) -> dict[str, torch.Tensor]:
        """Episode id -> ``[n_i]`` indices of its samples (in step order)."""
        out: dict[str, torch.Tensor] = {}
        for i, eid in enumerate(self.episode_ids):
            out[eid] = torch.nonzero(self.episode_index == i, as_tuple=False).flatten()
        return out


def window_indices(length: int, n_obs_steps: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays of the padded observation windows and action chunks of one episode.

    Args:
        length: Episode length ``T`` (>= 1).
        n_obs_steps: Observation window length.
        horizon: Action chunk length.

    Returns:
        ``obs_idx [T, n_obs]`` and ``act_idx [T, horizon]`` int64 indices into ``[0, T)``.
    """
    t = np.arange(length, dtype=np.int64)[:, None]
    obs_idx = np.clip(t + np.arange(-n_obs_steps + 1, 1, dtype=np.int64)[None, :], 0, length - 1)
    act_idx = np.clip(t + np.arange(horizon, dtype=np.int64)[None, :], 0, length - 1)
    return obs_idx, act_idx


def build_samples(
    episodes: Iterable[Episode],
    *,
    n_obs_steps: int = 1,
    horizon: int = 1,
    obs_keys: Sequence[str] | None = None,
) -> SampleSet:
    """Cut every step of every episode into one sample.

    Args:
        episodes: Episodes (any iterable, consumed once).
        n_obs_steps: Observation window length (1 for the MLP policy).
        horizon: Action chunk length (1 for the MLP policy).
        obs_keys: Observation keys to concatenate; default: sorted keys of the first
            episode.

    Returns:
        The SampleSet, with ``N = sum of episode lengths`` samples.

    Raises:
        ValueError: No episodes, an empty episode, a duplicated id, or an observation /
            action dimension that differs from the first episode's (the message names
            the episode and the field).
    """
    if n_obs_steps < 1 or horizon < 1:
        raise ValueError(f"n_obs_steps and horizon must be >= 1, got {n_obs_steps}, {horizon}")
    keys: tuple[str, ...] | None = tuple(obs_keys) if obs_keys is not None else None
    key_dims: dict[str, int] = {}
    action_dim: int | None = None
    obs_parts, act_parts, idx_parts, key_parts, step_parts = [], [], [], [], []
    ids: list[str] = []
    seen: set[str] = set()
    for ep in episodes:
        if not isinstance(ep, Episode):
            raise TypeError(f"expected Episode objects, got {type(ep).__name__}")
        if ep.episode_id in seen:
            raise ValueError(f"episode {ep.episode_id!r} appears twice")
        if ep.length == 0:
            raise ValueError(f"episode {ep.episode_id!r}: field 'action' is empty (length 0)")
        if keys is None:
            keys = tuple(sorted(ep.observations))
        for k in keys:
            if k not in ep.observations:
                raise ValueError(
                    f"episode {ep.episode_id!r}: missing field 'observation.{k}' "
                    f"(have {sorted(ep.observations)})"
                )
            d = int(ep.observations[k].shape[1])
            if key_dims.setdefault(k, d) != d:
                raise ValueError(
                    f"episode {ep.episode_id!r}: field 'observation.{k}' has dim {d}, "
                    f"expected {key_dims[k]} (from the first episode)"
                )
        a_dim = int(ep.actions.shape[1])
        if action_dim is None:
            action_dim = a_dim
        elif a_dim != action_dim:
            raise ValueError(
                f"episode {ep.episode_id!r}: field 'action' has dim {a_dim}, "
                f"expected {action_dim} (from the first episode)"
            )
        obs = ep.obs_vector(keys)
        if not (np.isfinite(obs).all() and np.isfinite(ep.actions).all()):
            raise ValueError(f"episode {ep.episode_id!r}: observations or actions are not finite")
        obs_idx, act_idx = window_indices(ep.length, n_obs_steps, horizon)
        obs_parts.append(obs[obs_idx])
        act_parts.append(ep.actions[act_idx])
        idx_parts.append(np.full(ep.length, len(ids), np.int64))
        key_parts.append(np.full(ep.length, episode_key(ep.episode_id), np.int64))
        step_parts.append(np.arange(ep.length, dtype=np.int64))
        ids.append(ep.episode_id)
        seen.add(ep.episode_id)
    if not ids:
        raise ValueError("no episodes to build samples from")
    return SampleSet(
        obs=torch.from_numpy(np.concatenate(obs_parts).astype(np.float32, copy=False)),
        action=torch.from_numpy(np.concatenate(act_parts).astype(np.float32, copy=False)),
        episode_index=torch.from_numpy(np.concatenate(idx_parts)),
        episode_key=torch.from_numpy(np.concatenate(key_parts)),
        step=torch.from_numpy(np.concatenate(step_parts)),
        episode_ids=ids,
        obs_keys=tuple(keys or ()),
    )


def image_windows(
    episodes: Sequence[Episode], keys: Sequence[str], *, n_obs_steps: int = 1
) -> dict[str, torch.Tensor]:
    """Camera frames of every step's observation window, in episode then step order.

    The window convention is :func:`build_samples`' (the first frame repeats where the
    window runs off the start), so row ``i`` here is sample ``i`` there. Frames stay
    ``uint8`` (a policy converts and normalises them on its device); lazily decoded
    sequences (``data.episode.ImageSequence``) are decoded here, one episode at a time.

    Args:
        episodes: The episodes (a sequence: read once per key).
        keys: Camera keys of ``Episode.images``.
        n_obs_steps: Observation window length.

    Returns:
        ``key -> uint8 [N, n_obs, H, W, C]`` with ``N`` the sum of episode lengths.

    Raises:
        ValueError: a missing camera key or a frame shape that differs from the first
            episode's (episode and key named).
    """
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        parts, shape = [], None
        for ep in episodes:
            if key not in ep.images:
                raise ValueError(f"episode {ep.episode_id!r}: missing field 'images.{key}' (have {sorted(ep.images)})")
            frames = np.asarray(ep.images[key], dtype=np.uint8)
            if shape is None:
                shape = frames.shape[1:]
            elif frames.shape[1:] != shape:
                raise ValueError(f"episode {ep.episode_id!r}: field 'images.{key}' has frames {frames.shape[1:]}, "
                                 f"expected {shape} (from the first episode)")
            obs_idx, _ = window_indices(ep.length, n_obs_steps, 1)
            parts.append(frames[obs_idx])
        out[key] = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.uint8)
    return out
