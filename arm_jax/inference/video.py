"""Reading video files frame by frame and writing annotated ones, with OpenCV (its wheels bundle FFmpeg).

OpenCV is imported where a video is opened: `predict` on face crops, which only needs
VIDEO_SUFFIXES, does not pay for its import.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from arm_jax.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
FOURCC = {".avi": "MJPG"}  # others: MPEG-4 part 2, which every OpenCV wheel can write
DEFAULT_FOURCC = "mp4v"


class VideoReader:
    """Every `every`-th frame of a video as (frame index, time in s, RGB uint8)."""

    def __init__(self, path: Path, every: int = 1):
        import cv2

        self.path, self.every = path, every
        self._capture = cv2.VideoCapture(str(path))
        if not self._capture.isOpened():
            raise UserError(f"{path}: not a readable video")
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 25.0
        self.frame_count = max(0, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    @property
    def selected_count(self) -> int:
        """How many frames will be yielded (from the header's frame count, which may be approximate)."""
        return -(-self.frame_count // self.every)

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        import cv2

        index = 0
        try:
            while True:
                if index % self.every:  # grab without decoding the frames that are skipped
                    if not self._capture.grab():
                        return
                else:
                    ok, frame = self._capture.read()
                    if not ok:
                        return
                    yield index, index / self.fps, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            self._capture.release()


class VideoWriter:
    """Writes RGB frames; the codec follows the file's suffix (.avi: MJPG, else mp4v)."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        import cv2

        fourcc = cv2.VideoWriter_fourcc(*FOURCC.get(path.suffix.lower(), DEFAULT_FOURCC))
        self.path = path
        self._writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
        if not self._writer.isOpened():
            raise UserError(f"{path}: OpenCV cannot write a video here")

    def write(self, frame: np.ndarray) -> None:
        import cv2

        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._writer.release()
