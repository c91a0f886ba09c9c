"""The server's settings, and an upload's bytes turned into pixels or refused with a 4xx error naming why.

An upload is opened with Pillow restricted to the four formats `predict` reads
(no exotic decoders reachable from the network), and its size is checked from
the header before a pixel is decoded: a decompression bomb (a small file that
decodes to gigabytes) is refused without being decompressed.
"""

import io
from dataclasses import dataclass, fields
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from arm_jax.errors import UserError
from arm_jax.inference.predict import upright_rgb

FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
MEDIA_TYPE_FORMATS = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/bmp": "BMP",
                      "image/x-ms-bmp": "BMP", "image/webp": "WEBP"}
UNTYPED = ("", "application/octet-stream")  # declares nothing: the content decides


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches and what it accepts; the CLI's defaults are these."""

    max_batch: int = 16  # faces per classifier call
    max_wait_ms: float = 10.0  # how long a batch waits for more faces after its first
    # Predict requests in the server at once (reading, decoding, waiting, running). Each holds its
    # decoded photo until answered, so memory peaks near max_queue x max_pixels x 3 bytes (2.4 GB).
    max_queue: int = 32
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 25_000_000  # width x height of an upload, read from its header
    timeout_s: float = 30.0  # per request: the body's arrival and the answer

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if not (value >= 0 if field.name == "max_wait_ms" else value > 0):
                raise UserError(f"{field.name.replace('_', '-')}: must be positive, not {value}")


class UploadError(Exception):
    """A request the client must fix: an HTTP status (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def declared_format(name: str, media_type: str | None) -> str | None:
    """The format the upload's file name and media type claim (None: they claim none); 415 for a non-image."""
    claims = []
    suffix = PurePosixPath(name).suffix.lower()
    if suffix:
        if suffix not in SUFFIX_FORMATS:
            raise UploadError(415, f"{name}: '{suffix}' is not an image file name's ending "
                                   f"({', '.join(SUFFIX_FORMATS)})")
        claims.append(SUFFIX_FORMATS[suffix])
    media_type = (media_type or "").split(";")[0].strip().lower()
    if media_type not in UNTYPED:
        if media_type not in MEDIA_TYPE_FORMATS:
            raise UploadError(415, f"{name}: sent as '{media_type}', not as an image "
                                   f"({', '.join(sorted(set(MEDIA_TYPE_FORMATS)))})")
        claims.append(MEDIA_TYPE_FORMATS[media_type])
    if len(set(claims)) > 1:
        raise UploadError(415, f"{name}: its name says {claims[0]} but it was sent as {media_type}")
    return claims[0] if claims else None


def decode_upload(data: bytes, name: str, media_type: str | None, max_pixels: int) -> np.ndarray:
    """An uploaded JPEG/PNG/BMP/WebP as upright uint8 RGB, as `predict` reads a file.

    Raises UploadError: 400 empty or undecodable (truncated, corrupt), 413 more than
    `max_pixels` (from the header, before decoding), 415 not an image or not the format
    its name or media type says.
    """
    if not data:
        raise UploadError(400, f"{name}: the image is empty (0 bytes)")
    claimed = declared_format(name, media_type)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own header check (beyond 2 x its limit)
        raise UploadError(413, f"{name}: too many pixels ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise UploadError(415, f"{name}: not a JPEG, PNG, BMP or WebP image") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise UploadError(413, f"{name}: {width} x {height} = {width * height:,} pixels, more than the "
                                   f"server's limit of {max_pixels:,} (--max-megapixels); refused from its header")
        if claimed is not None and image.format != claimed:
            raise UploadError(415, f"{name}: said to be {claimed} (by its name or media type) but it is {image.format}")
        try:
            return upright_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UploadError(400, f"{name}: a {image.format} image that cannot be decoded, truncated or "
                                   f"corrupt ({error})") from None
