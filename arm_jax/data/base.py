"""LabelledSplit, the random-access source every data set becomes, and its building blocks.

A reader turns a data set's files into `Records` (labels plus either decoded pixels or
image paths); `splits.open_split` wraps them in a `LabelledSplit`. Bad records are
collected in a `Problems` list so the user sees all of them at once, before training.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from arm_jax.errors import DatasetError

log = logging.getLogger(__name__)

# A truncated JPEG must fail to decode, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SPLITS = ("train", "val", "test")
# Far above any face image (AffectNet's largest are ~12 Mpx), far below what would exhaust
# memory: a 20000x20000 PNG (a decompression bomb, 380 KB on disk) is refused from its header.
MAX_IMAGE_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SHOWN_PROBLEMS = 5  # how many bad records an error message lists before "... and N more"


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """One record that cannot be used: where it is (file:line) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """What reading a split left out: bad records skipped, protocol drops (e.g. AffectNet 8-10)."""

    skipped: tuple[BadRecord, ...] = ()
    dropped: int = 0
    dropped_reason: str = ""


class Problems:
    """Collects bad records of one split; `check` raises them all, or logs and skips them."""

    def __init__(self, what: str):
        self.what = what
        self.bad: list[BadRecord] = []

    def add(self, file: str | Path, line: int | None, reason: str) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        self.bad.append(BadRecord(where, reason))

    def check(self, *, skip_bad: bool) -> tuple[BadRecord, ...]:
        """Raise DatasetError listing the bad records unless skip_bad; return those skipped."""
        if not self.bad:
            return ()
        if not skip_bad:
            raise DatasetError(describe_bad(self.what, self.bad)
                               + "\nFix the files, or pass --skip-bad (skip_bad=True) to leave "
                               "these records out.")
        log.warning("%s: skipped %d bad record(s); first: %s", self.what, len(self.bad),
                    self.bad[0])
        return tuple(self.bad)


def describe_bad(what: str, bad: list[BadRecord] | tuple[BadRecord, ...]) -> str:
    """The first few bad records, one per line, and the total count."""
    lines = [f"{what}: {len(bad)} bad record(s):"]
    lines += [f"  {b}" for b in bad[:_SHOWN_PROBLEMS]]
    if len(bad) > _SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(bad) - _SHOWN_PROBLEMS} more")
    return "\n".join(lines)


@dataclasses.dataclass
class Records:
    """What a reader found for one split: labels and either pixels or image paths."""

    class_names: tuple[str, ...]
    labels: np.ndarray                      # int32 (N,)
    images: np.ndarray | None = None        # uint8 (N, H, W, C) when the labels file holds pixels
    root: Path | None = None                # image paths are relative to this folder
    paths: list[str] | None = None          # one per label, relative to root
    mode: str = "RGB"                       # PIL mode images decode to: "RGB" or "L"
    dropped: int = 0
    dropped_reason: str = ""


def contained_path(root: Path, relative: str) -> Path | None:
    """root/relative resolved (symlinks followed), or None if it leaves root."""
    if not relative or os.path.isabs(relative):
        return None
    resolved = Path(os.path.realpath(root / relative))
    real_root = Path(os.path.realpath(root))
    return resolved if resolved.is_relative_to(real_root) else None


def _ends_cleanly(path: Path, head: bytes) -> bool:
    """Whether a JPEG/PNG file ends with its end marker (a truncated file does not)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
        tail = f.read().rstrip(b"\0\r\n ")
    if head.startswith(b"\xff\xd8"):
        return tail.endswith(b"\xff\xd9")
    if head.startswith(b"\x89PNG"):
        return tail.endswith(b"IEND\xaeB`\x82")
    return True  # other formats: the header parse below is all we check cheaply


class ImageTooLarge(ValueError):
    """An image with more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or not a face)."""


def open_image(source: Path | bytes) -> Image.Image:
    """PIL's lazy open (header only) of a path or bytes, refusing images over the pixel limit."""
    try:
        im = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except Image.DecompressionBombError as e:  # not an OSError: callers would miss it
        raise ImageTooLarge(f"too many pixels ({e})") from None
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        im.close()
        raise ImageTooLarge(f"{width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,}")
    return im


def image_problem(path: Path) -> str | None:
    """Why an image file is unusable (missing, empty, not an image, truncated, too large), or None.

    Cheap: reads the header and the last bytes. A file that fails the end-marker test
    gets a full decode before it is called bad, so odd-but-valid files are kept.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if not head:
            return "image file is empty"
        open_image(path).close()  # the header parse (and the pixel limit) is the check
        if not _ends_cleanly(path, head):
            decode_image(path, "RGB")
    except FileNotFoundError:
        return "image file is missing"
    except ImageTooLarge as e:
        return f"image is too large ({e})"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image file is corrupt ({type(e).__name__}: {e})"
    return None


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit and float gray images as 8-bit gray; PIL's convert would clip them at 255."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        return Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(np.asarray(im))), 0, 255).astype(np.uint8), "L")
    return im


def decode_image(source: Path | bytes, mode: str, size: int | None = None) -> np.ndarray:
    """Decode a JPEG/PNG (path or bytes) to uint8 (H, W, C); resize to size x size if given.

    Any PIL mode (gray, palette, CMYK, alpha, 16-bit) becomes `mode` ("RGB" or "L");
    ImageTooLarge (a ValueError) for images over MAX_IMAGE_PIXELS, before decoding.
    """
    with open_image(source) as im:
        im = _eight_bit(im)
        if im.mode != mode:  # convert() to the same mode would copy all pixels
            im = im.convert(mode)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        array = np.asarray(im, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def resize_uint8(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Bilinear resize (H, W, C) uint8 -> (height, width or height, C) uint8 with PIL.

    PIL's BILINEAR uses half-pixel centres and widens the filter when downscaling: the
    convention of jax.image.resize(..., 'bilinear', antialias=True), to within uint8 rounding,
    and what the released code does (torchvision Resize on a PIL image). It is also several
    times faster than a dense numpy resize for large images. The loader's host resize and
    `arm-jax predict` both use it; it lives here, beside decode_image, because this module
    does not import JAX (predict on an ONNX model never does).
    """
    width = height if width is None else width
    if image.shape[:2] == (height, width):
        return image
    if image.shape[-1] == 3:
        resized = Image.fromarray(np.ascontiguousarray(image), "RGB").resize(
            (width, height), Image.BILINEAR)
        return np.asarray(resized)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]))
                         .resize((width, height), Image.BILINEAR))
              for c in range(image.shape[-1])]
    return np.stack(planes, axis=-1)


class LabelledSplit:
    """A grain-compatible random-access split: `split[i]` -> {'image', 'label'}.

    Attributes: name ("fer2013/train"), class_names (label id order), labels (int32, all of
    them, available without decoding an image) and report (what reading left out).
    """

    def __init__(self, name: str, class_names: tuple[str, ...], labels: np.ndarray,
                 report: SplitReport = SplitReport()):
        self.name = name
        self.class_names = tuple(class_names)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.report = report

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range (size {len(self)})")
        index %= len(self)
        return {"image": self.image(index), "label": self.labels[index]}

    def image(self, index: int) -> np.ndarray:
        """The uint8 (H, W, C) image of record `index` (0 <= index < len)."""
        raise NotImplementedError

    def read_images(self, indices: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """The images of records `indices`: a list, or one (N, H, W, C) array where the split
        holds its pixels in one (a gather instead of N reads)."""
        return [self.image(int(i)) for i in indices]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


class ArraySplit(LabelledSplit):
    """Images held in memory as one uint8 array (FER2013's CSV pixels)."""

    def __init__(self, name, class_names, labels, images: np.ndarray, report=SplitReport()):
        super().__init__(name, class_names, labels, report)
        self.images = images

    def image(self, index: int) -> np.ndarray:
        return self.images[index]

    def read_images(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices)]


class FileSplit(LabelledSplit):
    """Images decoded from files on each access (checked cheaply when the split was opened)."""

    def __init__(self, name, class_names, labels, root: Path, paths: list[str], mode: str,
                 size: int | None = None, report=SplitReport()):
        super().__init__(name, class_names, labels, report)
        self.root, self.paths, self.mode, self.size = Path(root), list(paths), mode, size

    def image(self, index: int) -> np.ndarray:
        path = self.root / self.paths[index]
        try:
            return decode_image(path, self.mode, self.size)
        except (OSError, SyntaxError, ValueError) as e:
            # The open-time check is cheap, not a full decode: this is the backstop that
            # stops training rather than feeding the model a bad image.
            raise DatasetError(f"{path}: image cannot be decoded ({e}); run `arm-jax prepare` "
                               "to check every image before training") from e


class Subset(LabelledSplit):
    """`count` records of `base` drawn at random (seeded), in their original order."""

    def __init__(self, base: LabelledSplit, count: int, seed: int):
        count = min(count, len(base))
        self.base = base
        self.indices = np.sort(np.random.default_rng(seed).choice(len(base), count, replace=False))
        super().__init__(f"{base.name}[{count} of {len(base)}]", base.class_names,
                         base.labels[self.indices], base.report)

    def image(self, index: int) -> np.ndarray:
        return self.base[int(self.indices[index])]["image"]

    def read_images(self, indices: np.ndarray):
        return self.base.read_images(self.indices[np.asarray(indices)])


def check_image_paths(root: Path, paths: list[str], wheres: list[tuple[Path, int | None]],
                      problems: Problems, *, check_content: bool = True) -> np.ndarray:
    """Bool mask of the paths that stay inside root and (if check_content) are sound images.

    wheres[i] is the (file, line) that named paths[i], for the error message.
    """
    keep = np.ones(len(paths), dtype=bool)
    for i, (relative, (file, line)) in enumerate(zip(paths, wheres)):
        resolved = contained_path(root, relative)
        if resolved is None:
            problems.add(file, line, f"path {relative!r} points outside the dataset folder {root}")
            keep[i] = False
            continue
        reason = image_problem(resolved) if check_content else None
        if reason is not None:
            # A label-file line names its image; a folder entry is the image itself.
            problems.add(file, line, reason if line is None else f"{reason}: {root / relative}")
            keep[i] = False
    return keep
