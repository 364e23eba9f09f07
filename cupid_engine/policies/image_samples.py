"""Samples with camera frames and task text, for the image and transformer policies.

An :class:`ImageSampleSet` is a :class:`~cupid_engine.policies.samples.SampleSet` (low-dim
observation windows, action chunks, ``episode_key``/``step``) plus

* ``frames``: per camera, the episodes' frames concatenated once, ``uint8 [F, H, W, C]``
  (a frame is stored once however many observation windows contain it);
* ``frame_index [N, n_obs]``: row of ``frames`` of every step of every window, padded at
  the episode start exactly like the low-dim window (``samples.window_indices``);
* ``text [N, L]`` int64: the episode's task text as word-hash tokens (0 = padding), when
  the policy reads language (``L > 0``).

``batch()`` gathers ``image: uint8 [B, n_obs, K, H, W, C]`` (cameras in ``image_keys``
order) and ``text``; images stay uint8 until the policy's encoder converts them, so a
batch costs a quarter of its float size.

Episode API. Frames are read with ``episode.image_array(key)`` (``uint8 [T, H, W, C]``,
lazy views decoded here, once) and the text is ``episode.task`` (the readers' language
instruction). An episode without the camera raises an error naming it and the key.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cupid_engine.data.episode import Episode
from cupid_engine.policies.samples import SampleSet, build_samples, window_indices

__all__ = ["ImageSampleSet", "build_image_samples", "episode_images", "episode_text", "tokenize_text"]

_WORD = re.compile(r"[a-z0-9]+")


def tokenize_text(text: str, max_tokens: int, vocab_size: int) -> np.ndarray:
    """Word-hash tokens of ``text``: ``[max_tokens]`` int64, 0 = padding.

    Lower-cased alphanumeric words, each mapped to ``1 + crc32(word) mod (vocab_size - 1)``
    (stable across processes, unlike Python's ``hash``), truncated to ``max_tokens``.
    """
    if max_tokens < 1 or vocab_size < 2:
        raise ValueError(f"max_tokens must be >= 1 and vocab_size >= 2, got {max_tokens}, {vocab_size}")
    ids = [1 + zlib.crc32(w.encode("utf-8")) % (vocab_size - 1) for w in _WORD.findall(text.lower())]
    out = np.zeros(max_tokens, np.int64)
    ids = ids[:max_tokens]
    out[: len(ids)] = ids
    return out


def episode_images(ep: Episode, key: str) -> np.ndarray:
    """``uint8 [T, H, W, C]`` frames of camera ``key`` (decoded now); a clear error when absent."""
    if key not in ep.images:
        raise ValueError(f"episode {ep.episode_id!r}: missing image field {key!r} (have {sorted(ep.images)})")
    return np.ascontiguousarray(ep.image_array(key))


def episode_text(ep: Episode) -> str:
    """The episode's instruction: ``Episode.task`` (readers put the language instruction there)."""
    return ep.task


@dataclasses.dataclass
class ImageSampleSet(SampleSet):
    """A SampleSet with camera frames and task tokens (see module docstring).

    Attributes:
        frames: Camera key -> ``uint8 [F, H, W, C]`` frames of all episodes, concatenated.
        frame_index: ``[N, n_obs]`` int64 rows of ``frames`` of each window.
        text: ``[N, L]`` int64 tokens (``L = 0``: no language).
        image_keys: Camera keys, in the order of the batch's camera axis.
    """

    frames: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    frame_index: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.long))
    text: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    image_keys: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every camera."""
        return tuple(int(s) for s in self.frames[self.image_keys[0]].shape[1:])  # type: ignore[return-value]

    def batch(self, indices: torch.Tensor | Sequence[int] | slice | None = None) -> dict[str, torch.Tensor]:
        """Raw batch: the SampleSet fields plus ``image uint8 [B, n_obs, K, H, W, C]`` and
        ``text [B, L]`` int64."""
        out = super().batch(indices)
        if indices is None:
            indices = slice(None)
        elif not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        rows = self.frame_index[indices]  # [B, n_obs]
        out["image"] = torch.stack([self.frames[k][rows] for k in self.image_keys], dim=2)
        out["text"] = self.text[indices]
        return out

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageSampleSet:
        base = super().subset(indices)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSampleSet(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(SampleSet)},
            frames=self.frames,
            frame_index=self.frame_index[idx],
            text=self.text[idx],
            image_keys=self.image_keys,
        )


def build_image_samples(
    episodes: Iterable[Episode],
    *,
    n_obs_steps: int = 1,
    horizon: int = 1,
    obs_keys: Sequence[str] | None = None,
    image_keys: Sequence[str] | None = None,
    text_tokens: int = 0,
    vocab_size: int = 1024,
) -> ImageSampleSet:
    """Cut every step of every episode into one sample with its frames and text.

    Args:
        episodes: Episodes carrying ``images`` (consumed once; frames are copied once).
        n_obs_steps: Observation window length (frames and low-dim alike).
        horizon: Action chunk length.
        obs_keys: Low-dim observation keys (default: sorted keys of the first episode).
        image_keys: Camera keys (default: sorted image keys of the first episode).
        text_tokens: Tokens per task text (0: no ``text`` tokens, ``[N, 0]``).
        vocab_size: Hash buckets of :func:`tokenize_text` (token 0 is padding).

    Returns:
        The :class:`ImageSampleSet`.

    Raises:
        ValueError: What :func:`build_samples` raises, an episode without images or with a
            camera whose shape differs from the first episode's (named), or no cameras.
    """
    episodes = list(episodes)
    base = build_samples(episodes, n_obs_steps=n_obs_steps, horizon=horizon, obs_keys=obs_keys)
    keys = tuple(image_keys) if image_keys is not None else tuple(sorted(episodes[0].images))
    if not keys:
        raise ValueError(f"episode {episodes[0].episode_id!r} has no image fields; an image policy needs cameras")
    shapes: dict[str, tuple[int, ...]] = {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    index_parts, text_parts = [], []
    offset = 0
    for ep in episodes:
        for k in keys:
            arr = episode_images(ep, k)
            if shapes.setdefault(k, arr.shape[1:]) != arr.shape[1:]:
                raise ValueError(
                    f"episode {ep.episode_id!r}: image field {k!r} is {arr.shape[1:]}, expected {shapes[k]} "
                    "(from the first episode)"
                )
            parts[k].append(arr)
        obs_idx, _ = window_indices(ep.length, n_obs_steps, horizon)
        index_parts.append(obs_idx + offset)
        offset += ep.length
        tokens = tokenize_text(episode_text(ep), text_tokens, vocab_size) if text_tokens else np.zeros(0, np.int64)
        text_parts.append(np.broadcast_to(tokens, (ep.length, text_tokens)))
    if len({shapes[k] for k in keys}) != 1:
        raise ValueError(f"all cameras must share one (H, W, C); got {shapes}")
    return ImageSampleSet(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(SampleSet)},
        frames={k: torch.from_numpy(np.ascontiguousarray(np.concatenate(parts[k]))) for k in keys},
        frame_index=torch.from_numpy(np.concatenate(index_parts)),
        text=torch.from_numpy(np.ascontiguousarray(np.concatenate(text_parts))),
        image_keys=keys,
    )
