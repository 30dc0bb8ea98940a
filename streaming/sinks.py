"""Where a live run's edited frames go: an mp4 (with the captured audio) or a window.

The file sink keeps picture and sound in step even though a live session may drop
output frames when it falls behind: frames are placed by their pts on the 25 fps grid
(a gap repeats the previous frame) and the audio is cut to start at the first frame's
pts, so the file plays back exactly what was heard against what was shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from tccp.errors import TCCPError

__all__ = ["FrameSink", "FileSink", "WindowSink", "open_sink", "WINDOW"]

WINDOW = "window"
"""`out_path_or_window` value that selects the on-screen window."""


class FrameSink(Protocol):
    def add_audio(self, samples: np.ndarray, pts: float) -> None: ...

    def write(self, frame: np.ndarray, pts: float) -> None: ...

    @property
    def wants_stop(self) -> bool: ...

    def close(self) -> Path | None: ...

    def abort(self) -> None: ...


class FileSink:
    """mp4 (H.264 + AAC) written through `tccp.media.io.VideoWriter` (atomic on close)."""

    def __init__(self, path: str | Path, fps: float = 25.0, sr: int = 16000, audio: bool = True,
                 max_gap_s: float = 2.0) -> None:
        from tccp.media.io import VideoWriter

        self.path = Path(path)
        if self.path.suffix.lower() not in (".mp4", ".m4v", ".mov"):
            raise TCCPError(f"{self.path}: output must be an .mp4 file (or '{WINDOW}')")
        self.fps = float(fps)
        self.sr = int(sr)
        self.max_gap_s = max_gap_s
        self._writer = VideoWriter(self.path, fps=fps, sr=sr, has_audio=audio)
        self._audio = audio
        self._p0: float | None = None
        self._audio_next: float | None = None  # session time of the next sample the file needs
        self._pending: list[tuple[float, np.ndarray]] = []
        self._last: np.ndarray | None = None
        self.frames = 0
        self.repeated = 0

    @property
    def wants_stop(self) -> bool:
        return False

    def add_audio(self, samples: np.ndarray, pts: float) -> None:
        if not self._audio:
            return
        samples = np.asarray(samples, np.float32).reshape(-1)
        if self._p0 is None:  # file time 0 is not known before the first frame
            self._pending.append((pts, samples))
            return
        self._put_audio(samples, pts)

    def _put_audio(self, samples: np.ndarray, pts: float) -> None:
        assert self._audio_next is not None
        end = pts + samples.size / self.sr
        lag = int(round((pts - self._audio_next) * self.sr))
        if lag < 0:  # overlaps what was written (or starts before frame 0): cut
            samples = samples[min(-lag, samples.size):]
        elif lag > 0:  # a hole in the capture: silence keeps later audio in place
            self._writer.write_audio(np.zeros(lag, np.float32))
        if samples.size:
            self._writer.write_audio(samples)
        self._audio_next = max(self._audio_next, end)

    def write(self, frame: np.ndarray, pts: float) -> None:
        if self._p0 is None:
            self._p0 = pts
            self._audio_next = pts
            pending, self._pending = self._pending, []
            for t, s in pending:
                self._put_audio(s, t)
        k = int(round((pts - self._p0) * self.fps))
        gap = k - self.frames
        if self._last is not None and 0 < gap <= self.max_gap_s * self.fps:
            for _ in range(gap):
                self._writer.write(self._last)
                self.frames += 1
                self.repeated += 1
        if k < self.frames:
            return  # out of order / duplicate pts: already covered
        self._writer.write(frame)
        self._last = frame
        self.frames += 1

    def close(self) -> Path | None:
        if self.frames == 0:
            self._writer.abort()
            raise TCCPError(f"{self.path}: no frames were produced (nothing was written)")
        return self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


class WindowSink:
    """An OpenCV window (needs an OpenCV build with GUI support and a display)."""

    def __init__(self, title: str = "tccp live") -> None:
        import os

        import cv2

        self.title = title
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and os.name == "posix":
            raise TCCPError(f"{WINDOW}: no display available; give an output .mp4 path instead")
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise TCCPError(
                f"{WINDOW}: this OpenCV build cannot open windows (opencv-python-headless); "
                "give an output .mp4 path instead"
            ) from None
        self._stop = False

    @property
    def wants_stop(self) -> bool:
        return self._stop

    def add_audio(self, samples: np.ndarray, pts: float) -> None:
        pass  # the speaker hears themselves; nothing to play back

    def write(self, frame: np.ndarray, pts: float) -> None:
        import cv2

        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self._stop = True

    def close(self) -> Path | None:
        import cv2

        cv2.destroyWindow(self.title)
        return None

    def abort(self) -> None:
        self.close()


def open_sink(out_path_or_window: str | Path | None, fps: float = 25.0, sr: int = 16000) -> FileSink | WindowSink:
    """`None` or 'window' -> WindowSink; a path -> FileSink (checked up front)."""
    if out_path_or_window is None or str(out_path_or_window) == WINDOW:
        return WindowSink()
    return FileSink(out_path_or_window, fps=fps, sr=sr)
