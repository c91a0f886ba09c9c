"""Synthetic faces: procedurally drawn expressions for tests and demos without any download.

The class is set by facial geometry only (mouth curve and opening, brow angle and
height, eye opening); pose, scale, skin and background tone, lighting and noise are drawn
per image, so pixels alone do not give the class away. Image i of a split is drawn from
(seed, split, i) alone: random access, no state, identical bytes on every machine.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw

from arm_jax.data.base import LabelledSplit
from arm_jax.data.readers.fer2013 import CLASS_NAMES

SIZE = 64                         # native image side
_CANVAS = 128                     # drawn at 2x, then downsampled, for smooth edges
DEFAULT_SIZES = {"train": 2100, "val": 700, "test": 700}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Canvas coordinates in -0.5..0.5, for the background and lighting gradients.
_YY, _XX = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32) / _CANVAS - 0.5


@dataclasses.dataclass(frozen=True)
class Expression:
    """Mean geometry of one class; each image adds jitter to every field."""

    mouth_curve: float   # + smile (corners up), - frown; in canvas pixels
    mouth_open: float    # lip gap at the centre
    mouth_tilt: float    # one corner up (disgust's sneer)
    brow_lift: float     # brow height above the eyes' usual place
    brow_angle: float    # + inner ends down (anger), - inner ends up (fear, sadness)
    eye_open: float      # eye height


# In fer2013 order. Neutral and sad differ only by a small frown and inner-brow lift,
# fear and surprise share wide eyes and an open mouth: those pairs are meant to confuse.
EXPRESSIONS = (
    Expression(mouth_curve=-3, mouth_open=0, mouth_tilt=0, brow_lift=-4, brow_angle=9,
               eye_open=5),                                                      # angry
    Expression(mouth_curve=-4, mouth_open=1, mouth_tilt=5, brow_lift=-2, brow_angle=4,
               eye_open=4),                                                      # disgust
    Expression(mouth_curve=-2, mouth_open=6, mouth_tilt=0, brow_lift=5, brow_angle=-6,
               eye_open=11),                                                     # fear
    Expression(mouth_curve=9, mouth_open=2, mouth_tilt=0, brow_lift=1, brow_angle=0,
               eye_open=6),                                                      # happy
    Expression(mouth_curve=-5, mouth_open=0, mouth_tilt=0, brow_lift=1, brow_angle=-4,
               eye_open=6),                                                      # sad
    Expression(mouth_curve=0, mouth_open=12, mouth_tilt=0, brow_lift=9, brow_angle=-1,
               eye_open=11),                                                     # surprise
    Expression(mouth_curve=-1, mouth_open=0, mouth_tilt=0, brow_lift=0, brow_angle=0,
               eye_open=7),                                                      # neutral
)
_JITTER = Expression(mouth_curve=2.0, mouth_open=1.5, mouth_tilt=1.5, brow_lift=2.0,
                     brow_angle=2.5, eye_open=1.5)


def _jittered(label: int, rng: np.random.Generator) -> Expression:
    """The class geometry plus per-image Gaussian jitter."""
    mean, spread = dataclasses.asdict(EXPRESSIONS[label]), dataclasses.asdict(_JITTER)
    return Expression(**{k: mean[k] + spread[k] * rng.standard_normal() for k in mean})


def _draw_face(e: Expression, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """An upright face (gray levels) on the canvas and its mask."""
    face, mask = Image.new("L", (_CANVAS,) * 2, 0), Image.new("L", (_CANVAS,) * 2, 0)
    c = _CANVAS / 2
    half_w, half_h = rng.uniform(34, 42), rng.uniform(44, 52)
    skin = int(rng.uniform(130, 220))
    ink = int(rng.uniform(10, 70))
    box = (c - half_w, c - half_h, c + half_w, c + half_h)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    draw = ImageDraw.Draw(face)
    draw.ellipse(box, fill=skin)
    eye_y, eye_dx = c - rng.uniform(8, 13), rng.uniform(14, 18)
    for side in (-1, 1):
        ex = c + side * eye_dx
        h = max(e.eye_open, 1.0) / 2
        draw.ellipse((ex - 7, eye_y - h, ex + 7, eye_y + h), fill=ink)
        # Brow: a thick line; angle > 0 lowers its inner end (towards the nose).
        by = eye_y - 11 - e.brow_lift
        inner = (ex - side * 8, by + e.brow_angle / 2)
        outer = (ex + side * 9, by - e.brow_angle / 2)
        draw.line([inner, outer], fill=ink, width=4)
    draw.line([(c, eye_y + 6), (c - 3, c + 10)], fill=max(skin - 50, 0), width=2)   # nose
    mouth_y, half_mouth = c + rng.uniform(20, 26), rng.uniform(12, 17)
    x = np.linspace(-1.0, 1.0, 15)
    bow = 1.0 - x * x
    # y grows downwards: a smile puts the centre below the corners.
    corners = mouth_y - e.mouth_curve - e.mouth_tilt * x / 2
    upper = corners + (e.mouth_curve - e.mouth_open / 2) * bow
    lower = corners + (e.mouth_curve + e.mouth_open / 2) * bow
    xs = c + half_mouth * x
    outline = list(zip(xs, upper)) + list(zip(xs[::-1], lower[::-1]))
    draw.polygon(outline, fill=ink)
    draw.line(list(zip(xs, upper)), fill=ink, width=3)
    return face, mask


def _pose(rng: np.random.Generator) -> tuple[float, ...]:
    """A random rotation, scale and shift of the canvas, as PIL's affine matrix."""
    angle, scale = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.85, 1.05)
    shift = rng.uniform(-6, 6, size=2)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    c = _CANVAS / 2
    # PIL maps output (x, y) to input (a x + b y + c0, d x + e y + f0).
    matrix = (cos, sin, c - cos * (c + shift[0]) - sin * (c + shift[1]),
              -sin, cos, c + sin * (c + shift[0]) - cos * (c + shift[1]))
    return matrix


def draw(seed: int, split: str, index: int, label: int) -> np.ndarray:
    """Synthetic face `index` of `split`: uint8 (64, 64, 3), a function of its arguments only."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    face, mask = _draw_face(_jittered(label, rng), rng)
    pose = _pose(rng)
    face, mask = (im.transform(im.size, Image.AFFINE, pose, resample=Image.BILINEAR)
                  for im in (face, mask))
    yy, xx = _YY, _XX
    direction = rng.uniform(0, 2 * np.pi)
    background = rng.uniform(40, 200) + rng.uniform(-60, 60) * (
        np.cos(direction) * xx + np.sin(direction) * yy)
    alpha = np.asarray(mask, np.float32) / 255
    gray = alpha * np.asarray(face, np.float32) + (1 - alpha) * background
    # Lighting: a gradient across the face, contrast and brightness, a colour cast, noise.
    light = np.cos(direction + 1) * xx + np.sin(direction + 1) * yy
    gray = gray * (1 + rng.uniform(-0.4, 0.4) * light)
    gray = (gray - 128) * rng.uniform(0.6, 1.2) + 128 + rng.uniform(-30, 30)
    small = np.asarray(Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).resize(
        (SIZE, SIZE), Image.BILINEAR), np.float32)
    rgb = small[..., None] * rng.uniform(0.85, 1.15, size=3)
    rgb += rng.normal(0, rng.uniform(3, 12), size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def balanced_labels(seed: int, split: str, size: int) -> np.ndarray:
    """size labels, each class size/7 times (+1 for the first size % 7), in a seeded order."""
    labels = np.arange(size, dtype=np.int32) % len(CLASS_NAMES)
    return np.random.default_rng([seed, 100 + _SPLIT_IDS[split]]).permutation(labels)


# Drawing a face costs ~2.8 ms of CPU; each epoch reads every face again (and evaluation,
# calibration and the tests read the same splits repeatedly). The faces are a pure function of
# their arguments, so each process keeps what it drew: 12 KB each, at most ~100 MB.
_DRAWN_PER_PROCESS = 8192


@functools.lru_cache(maxsize=_DRAWN_PER_PROCESS)
def _drawn(seed: int, split: str, index: int, label: int) -> np.ndarray:
    """`draw`'s face, read-only: every caller shares the one array."""
    image = draw(seed, split, index, label)
    image.flags.writeable = False
    return image


class SyntheticSplit(LabelledSplit):
    """A split of synthetic faces, drawn on access from (seed, split, index) (once per process)."""

    def __init__(self, split: str, *, seed: int = 0, size: int | None = None):
        size = DEFAULT_SIZES[split] if size is None else size
        super().__init__(f"synthetic/{split}", CLASS_NAMES, balanced_labels(seed, split, size))
        self.split, self.seed = split, seed

    def image(self, index: int) -> np.ndarray:
        return _drawn(self.seed, self.split, int(index), int(self.labels[index]))
