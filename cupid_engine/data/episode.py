"""The in-memory episode: the unit every reader yields and every writer consumes.

Images and language (for image and language-conditioned policies)
-----------------------------------------------------------------
* ``Episode.images`` maps a camera key to a ``uint8 [T, H, W, C]`` sequence, one frame per
  step (``C`` is 3 for RGB, 1 for grey, 4 for RGBA). A value is either a NumPy array or an
  :class:`ImageSequence`, a lazily decoded view with the same interface (``shape``,
  ``dtype``, ``len``, ``[i]`` / ``[a:b]`` indexing, ``np.asarray``). Readers hand out views,
  so an episode whose images are never looked at costs no decoding. Policies read them as::

      frames = ep.image_array("agentview")      # np.uint8 [T, H, W, C], decoded now
      frame0 = ep.images["agentview"][0]        # np.uint8 [H, W, C], one frame

  Camera keys are the dataset's own names without the format's observation prefix:
  ``agentview_image`` (robomimic ``obs/agentview_image``), ``image`` (RLDS
  ``steps/observation/image``), ``agentview`` (LeRobot ``observation.images.agentview``),
  ``img`` (diffusion_policy ``data/img``). Low-dimensional observations stay in
  ``Episode.observations`` (``float32 [T, d]``); a key is in one of the two, never both.
* Language: the episode's natural-language instruction is ``Episode.task`` (RLDS
  ``language_instruction`` / RT-1 ``observation/natural_language_instruction``, LeRobot task
  strings, robomimic/robosuite task names). It is the catalog's ``task`` column, so scorers
  and queries see the same text the policy was conditioned on. When the instruction
  changes within an episode, ``task`` is the first step's and
  ``metadata["instructions"]`` lists ``[start_step, text]`` for every change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ImageSequence:
    """A lazily decoded ``uint8 [T, H, W, C]`` image sequence (one camera of one episode).

    Behaves like a read-only array of that shape: ``len(seq) == T``, ``seq[i]`` is a
    ``[H, W, C]`` frame, ``seq[a:b]`` / ``seq[[i, j]]`` stack frames, ``np.asarray(seq)``
    decodes everything. Nothing is cached: each access decodes again, so holding a view is
    cheap and memory stays bounded by what the caller keeps.

    Args:
        shape: ``(T, H, W, C)``, known from the dataset's metadata without decoding.
        frame: ``i -> uint8 [H, W, C]`` decoder of one frame (e.g. a PNG/JPEG blob).
        frames: Optional ``(start, stop) -> uint8 [stop - start, H, W, C]`` decoder of a
            run of frames (a video segment, an HDF5/zarr slice); faster than ``frame`` in
            a loop when given.
        what: Where the images come from (file, episode, key), named in errors.
    """

    __slots__ = ("_shape", "_frame", "_frames", "what")

    def __init__(
        self,
        shape: Sequence[int],
        frame: Callable[[int], np.ndarray] | None = None,
        frames: Callable[[int, int], np.ndarray] | None = None,
        *,
        what: str = "images",
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) <= 0:
            raise ValueError(f"{what}: image sequence shape must be [T, H, W, C] with positive sizes, got {shape}")
        if frame is None and frames is None:
            raise ValueError(f"{what}: give a frame or frames decoder")
        self._shape, self._frame, self._frames, self.what = shape, frame, frames, what

    @classmethod
    def from_encoded(cls, blobs: Sequence[bytes], frame_shape: Sequence[int] | None = None, *, what: str = "images") -> ImageSequence:
        """A view over per-step encoded images (PNG, JPEG, ... anything Pillow reads).

        Args:
            blobs: ``T`` encoded images.
            frame_shape: ``(H, W, C)``; None decodes the first blob to learn it.
            what: Named in errors.
        """
        blobs = list(blobs)
        if not blobs:
            raise ValueError(f"{what}: no encoded frames")
        if frame_shape is None:
            frame_shape = decode_image(blobs[0], what=f"{what}[0]").shape
        hwc = tuple(int(s) for s in frame_shape)
        return cls((len(blobs), *hwc), frame=lambda i: decode_image(blobs[i], hwc, what=f"{what}[{i}]"), what=what)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        return f"ImageSequence(shape={self._shape}, what={self.what!r})"

    def _check(self, arr: np.ndarray, n: int) -> np.ndarray:
        arr = np.asarray(arr)
        want = (n, *self._shape[1:])
        if arr.dtype != np.uint8 or arr.shape != want:
            raise ValueError(f"{self.what}: decoded {arr.dtype} {arr.shape}, expected uint8 {want}")
        return arr

    def _range(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros((0, *self._shape[1:]), np.uint8)
        if self._frames is not None:
            return self._check(self._frames(a, b), b - a)
        return self._check(np.stack([self._frame(i) for i in range(a, b)]), b - a)

    def __getitem__(self, index: Any) -> np.ndarray:
        T = self._shape[0]
        if isinstance(index, (int, np.integer)):
            i = int(index) + T if index < 0 else int(index)
            if not 0 <= i < T:
                raise IndexError(f"{self.what}: frame {index} out of range for {T} frames")
            if self._frame is not None:
                return self._check(self._frame(i)[None], 1)[0]
            return self._range(i, i + 1)[0]
        if isinstance(index, slice):
            a, b, step = index.indices(T)
            if step == 1:
                return self._range(a, b)
            return self._range(0, T)[index] if self._frame is None else self[list(range(a, b, step))]
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if self._frame is not None:
            return np.stack([self[int(i)] for i in idx]) if idx.size else self._range(0, 0)
        return self._range(0, T)[idx]

    def numpy(self) -> np.ndarray:
        """All frames, decoded: ``uint8 [T, H, W, C]``."""
        return self._range(0, self._shape[0])

    def __reduce__(self) -> tuple[Any, ...]:
        # Decoders are closures over open readers; a pickled view travels as its pixels.
        return (np.asarray, (self.numpy(),))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)


def decode_image(blob: bytes, frame_shape: Sequence[int] | None = None, *, what: str = "image") -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, ...) to ``uint8 [H, W, C]`` with Pillow.

    Grey images get ``C = 1``. Raises ``ValueError`` naming ``what`` when the bytes are
    not an image or the decoded shape differs from ``frame_shape``.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{what}: cannot decode image ({exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if frame_shape is not None and tuple(arr.shape) != tuple(int(s) for s in frame_shape):
        want = tuple(int(s) for s in frame_shape)
        if len(want) == 3 and want[:2] == arr.shape[:2] and want[2] == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        else:
            raise ValueError(f"{what}: decoded shape {arr.shape}, the dataset declares {want}")
    return arr


def encode_png(frame: np.ndarray) -> bytes:
    """``uint8 [H, W, C]`` (C in 1, 3, 4) -> PNG bytes (lossless)."""
    import io

    from PIL import Image

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise ValueError(f"encode_png needs uint8 [H, W, 1|3|4], got {frame.dtype} {frame.shape}")
    im = Image.fromarray(frame[:, :, 0] if frame.shape[2] == 1 else frame)
    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at every level; 1 is several times faster to write.
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


ImageLike = np.ndarray | ImageSequence
"""What ``Episode.images`` values are: a ``uint8 [T, H, W, C]`` array or a lazy view of one."""


@dataclasses.dataclass
class Episode:
    """One demonstration or rollout.

    Attributes:
        episode_id: Unique string id within a dataset/store. Data, never a path.
        observations: ``observation key -> [T, d_key]`` float32 arrays (keys without the
            ``observation.`` prefix). Low-dimensional only; images go in ``images``.
        actions: ``[T, A]`` float32 actions.
        split: One of ``constants.SPLITS`` (train, holdout, validation, rollout, target).
        source: Free-form origin (dataset name, ``sim:lift``, ...).
        task: Task name, or the natural-language instruction of a language-conditioned
            dataset (see the module docstring); the catalog's ``task`` column.
        success: Whether the episode succeeded (None if unknown).
        return_: Scalar return (None if unknown).
        tier: Quality tier (better/okay/worse) if known, else None.
        metadata: JSON-serialisable free metadata (strategy parameters, env knobs ...).
        images: ``camera key -> uint8 [T, H, W, C]`` (array or :class:`ImageSequence`);
            empty for state-only datasets.
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
    images: dict[str, ImageLike] = dataclasses.field(default_factory=dict)

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
        images: dict[str, ImageLike] = {}
        for key, value in (self.images or {}).items():
            if key in obs:
                raise ValueError(f"episode {self.episode_id!r}: key {key!r} is both an observation and an image")
            if not isinstance(value, ImageSequence):
                value = np.asarray(value)
                if value.dtype != np.uint8:
                    raise ValueError(
                        f"episode {self.episode_id!r}: field 'images.{key}' must be uint8 [T, H, W, C], got {value.dtype}"
                    )
            if len(value.shape) != 4 or value.shape[0] != T or min(value.shape) <= 0:
                raise ValueError(
                    f"episode {self.episode_id!r}: field 'images.{key}' has shape {tuple(value.shape)}, "
                    f"expected [{T}, H, W, C] to match 'action'"
                )
            images[key] = value
        self.images = images
        if self.return_ is not None and not math.isfinite(float(self.return_)):
            raise ValueError(f"episode {self.episode_id!r}: field 'return' is not finite")

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``camera key -> (H, W, C)``, known without decoding."""
        return {k: tuple(int(s) for s in v.shape[1:]) for k, v in self.images.items()}  # type: ignore[misc]

    def image_array(self, key: str) -> np.ndarray:
        """Camera ``key`` decoded: ``uint8 [T, H, W, C]``.

        Raises:
            KeyError: Naming the key and the episode's image keys.
        """
        if key not in self.images:
            raise KeyError(f"episode {self.episode_id!r}: no image key {key!r} (has {sorted(self.images)})")
        value = self.images[key]
        return value.numpy() if isinstance(value, ImageSequence) else np.asarray(value)

    def obs_vector(self, keys: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """Concatenate observation keys (sorted unless given) into ``[T, D]`` float32."""
        keys = sorted(self.observations) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.observations]
        if missing:
            raise KeyError(f"episode {self.episode_id!r}: missing observation keys {missing}")
        if not keys:
            return np.zeros((self.length, 0), np.float32)
        return np.concatenate([self.observations[k] for k in keys], axis=1)
