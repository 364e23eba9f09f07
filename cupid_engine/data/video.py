"""Video features: encode frames to MP4 and decode episode segments back, with PyAV.

LeRobot stores camera streams as MP4 files (v3.0: many episodes concatenated per file,
each episode located by ``from_timestamp``; v2.1: one file per episode). PyAV bundles
FFmpeg's decoders (AV1 via dav1d, H.264, VP9, ...), so no system FFmpeg is needed.

Frame ``k`` of a file is written with ``pts = k`` in a ``1/fps`` time base; reading an
episode segment seeks to the key frame before its first frame and keeps the decoded
frames whose time rounds to the wanted indices, so any seekable file works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cupid_engine.data.schema import FormatError

DEFAULT_CODEC = "libx264"
"""H.264 (x264): every FFmpeg/lerobot decodes it, and it is quiet; ``libsvtav1`` (lerobot's
default) also works through :class:`VideoWriter`."""
DEFAULT_CRF = 18
# Key frame every 2 frames as lerobot does: seeking to any episode start decodes at most one extra frame.
DEFAULT_GOP = 2


class VideoWriter:
    """Append ``uint8 [n, H, W, 3]`` frames to one MP4 file.

    Args:
        path: Output file.
        height, width: Frame size. yuv420p needs even sizes: odd ones are padded by one
            edge row/column, which :func:`decode_segment` crops away again.
        fps: Frame rate; frame ``k`` has time ``k / fps``.
        codec: FFmpeg encoder name (``libx264``, ``libsvtav1``, ...).
        crf: Constant rate factor (quality; lower is better).
    """

    def __init__(self, path: str, height: int, width: int, fps: int, *, codec: str = DEFAULT_CODEC, crf: int = DEFAULT_CRF) -> None:
        import av
        from fractions import Fraction

        self.path = str(path)
        self.height, self.width, self.fps = int(height), int(width), int(fps)
        self.codec = codec
        self.n_frames = 0
        self._container = av.open(self.path, mode="w", format="mp4")
        try:
            self._stream = self._container.add_stream(codec, rate=self.fps)
        except (ValueError, av.error.FFmpegError) as exc:
            self._container.close()
            raise ValueError(f"video codec {codec!r} is not available in this PyAV build ({exc})") from None
        self._stream.width, self._stream.height = self.width + self.width % 2, self.height + self.height % 2
        self._stream.pix_fmt = "yuv420p"
        self._time_base = Fraction(1, self.fps)
        self._stream.options = {"crf": str(int(crf)), "g": str(DEFAULT_GOP)}

    def write(self, frames: np.ndarray) -> None:
        """Append frames ``uint8 [n, H, W, 3]`` (grey ``[n, H, W, 1]`` is expanded to RGB)."""
        import av

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[1:3] != (self.height, self.width) or frames.shape[3] not in (1, 3):
            raise ValueError(f"{self.path}: frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}")
        if frames.shape[3] == 1:
            frames = np.repeat(frames, 3, axis=3)
        if self.height % 2 or self.width % 2:
            frames = np.pad(frames, ((0, 0), (0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = self.n_frames
            vf.time_base = self._time_base
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.n_frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None


def decode_segment(
    fs: Any, path: str, from_timestamp: float, start: int, stop: int, fps: float, *, what: str,
    frame_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``start .. stop-1`` of the episode beginning at ``from_timestamp``.

    Args:
        fs: fsspec filesystem holding ``path``.
        path: The MP4 file.
        from_timestamp: Time (s) of the episode's frame 0 in the file.
        start, stop: Frame range within the episode.
        fps: Frames per second of the dataset.
        what: Named in errors (dataset, episode, camera).
        frame_size: ``(H, W)`` the dataset declares; frames decoded one row/column larger
            (the even-size padding of :class:`VideoWriter`) are cropped to it.

    Returns:
        ``uint8 [stop - start, H, W, 3]``.

    Raises:
        FormatError: If the file cannot be decoded or lacks some of the frames.
    """
    import av

    n = stop - start
    out: list[np.ndarray | None] = [None] * n
    try:
        with fs.open(path, "rb") as f, av.open(f, mode="r") as container:
            stream = container.streams.video[0]
            t0 = float(from_timestamp) + start / fps
            if stream.time_base is not None and t0 > 0:
                # Seek lands on the key frame at or before t0; frames before it are skipped below.
                container.seek(max(int((t0 - 0.5 / fps) / stream.time_base), 0), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                k = int(round((float(frame.time) - float(from_timestamp)) * fps))
                if k < start:
                    continue
                if k >= stop:
                    break
                img = frame.to_ndarray(format="rgb24")
                if frame_size is not None and img.shape[0] - frame_size[0] in (0, 1) and img.shape[1] - frame_size[1] in (0, 1):
                    img = img[: frame_size[0], : frame_size[1]]
                out[k - start] = img
    except (av.error.FFmpegError, OSError) as exc:
        raise FormatError(f"{what}: cannot decode video {path!r} ({exc})") from None
    missing = [start + i for i, fr in enumerate(out) if fr is None]
    if missing:
        raise FormatError(
            f"{what}: video {path!r} has no frames for episode steps {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(from_timestamp {from_timestamp}, fps {fps})"
        )
    return np.stack(out)  # type: ignore[arg-type]
