"""Filmstrip sprites: an episode's frames as one small JPEG the pages scrub through.

One image per episode (frames side by side) instead of one file per frame keeps a site
of 10⁴ episodes to 10⁴ files and lets a page show any step by moving a background
offset. Frames are subsampled to at most ``max_frames`` (steps are recorded so a step
maps to its nearest frame) and resized to ``size`` pixels on the long side.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from cupid_engine.data.episode import Episode


@dataclasses.dataclass(frozen=True)
class Filmstrip:
    """A sprite of frames of one camera of one episode.

    Attributes:
        jpeg: Encoded sprite, frames left to right.
        steps: ``[F]`` episode step shown by each frame.
        width: Width of one frame in the sprite (pixels).
        height: Height of one frame (pixels).
        camera: Camera key the frames come from.
    """

    jpeg: bytes
    steps: list[int]
    width: int
    height: int
    camera: str

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "w": self.width, "h": self.height, "camera": self.camera}


def pick_camera(ep: Episode, camera: str | None) -> str | None:
    """The camera to show: ``camera`` when given (an error if the episode lacks it), else
    the first key in sorted order; None for a state-only episode."""
    if camera is not None:
        if camera not in ep.images:
            raise KeyError(f"episode {ep.episode_id!r} has no camera {camera!r} (it has {sorted(ep.images) or 'none'})")
        return camera
    return sorted(ep.images)[0] if ep.images else None


def frame_steps(length: int, max_frames: int) -> list[int]:
    """Steps of at most ``max_frames`` frames spread evenly over ``length`` steps (ends included)."""
    if length <= max_frames:
        return list(range(length))
    return sorted({int(round(i * (length - 1) / (max_frames - 1))) for i in range(max_frames)})


def filmstrip(ep: Episode, *, camera: str | None = None, max_frames: int = 48, size: int = 96,
              quality: int = 90) -> Filmstrip | None:
    """The episode's filmstrip, or None when it has no images.

    Args:
        ep: Episode (images may be lazy views: only the chosen frames are decoded).
        camera: Camera key (default: first in sorted order).
        max_frames: Frames in the sprite.
        size: Long side of one frame in pixels (never upscaled).
        quality: JPEG quality.
    """
    from PIL import Image

    cam = pick_camera(ep, camera)
    if cam is None:
        return None
    seq = ep.images[cam]
    steps = frame_steps(len(seq), max_frames)
    frames = np.asarray(seq[steps])  # [F, H, W, C] uint8
    h, w = frames.shape[1:3]
    scale = min(1.0, size / max(h, w))
    fw, fh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    sprite = Image.new("RGB", (fw * len(steps), fh))
    for i, frame in enumerate(frames):
        if frame.shape[2] == 1:
            frame = np.repeat(frame, 3, axis=2)
        img = Image.fromarray(np.ascontiguousarray(frame[..., :3]))
        if (fw, fh) != (w, h):
            img = img.resize((fw, fh), Image.BILINEAR)
        sprite.paste(img, (i * fw, 0))
    buf = io.BytesIO()
    # 4:4:4: small robot frames carry thin coloured edges that chroma subsampling smears.
    sprite.save(buf, format="JPEG", quality=quality, subsampling=0)
    return Filmstrip(buf.getvalue(), steps, fw, fh, cam)
