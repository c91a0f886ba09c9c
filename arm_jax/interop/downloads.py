"""Weights known by name: download once into a cache, verify, reuse (`--pretrained imagenet`).

torchvision's convention: a weight file's name ends in the first hex digits of its
SHA-256 (`resnet18-f37072fd.pth`); a download whose hash does not start with them is
refused. Nothing here runs unless a command names the weights.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path

from arm_jax.errors import UserError

IMAGENET_NAME = "imagenet"
IMAGENET_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
URL_VARIABLE = "ARM_JAX_IMAGENET_URL"    # a mirror (or a test server); its file name carries the hash
CACHE_VARIABLE = "ARM_JAX_CACHE"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")
_TIMEOUT_S = 30


def cache_dir() -> Path:
    """$ARM_JAX_CACHE, else ~/.cache/arm-jax."""
    return Path(os.environ.get(CACHE_VARIABLE) or "~/.cache/arm-jax").expanduser()


def imagenet_url() -> str:
    """Where torchvision's ImageNet ResNet-18 comes from ($ARM_JAX_IMAGENET_URL overrides)."""
    return os.environ.get(URL_VARIABLE) or IMAGENET_URL


def resolve_weights(name_or_path: str | Path) -> Path:
    """'imagenet' -> the cached (downloaded on first use) torchvision resnet18; else the path."""
    if str(name_or_path).lower() == IMAGENET_NAME:
        return cached_download(imagenet_url())
    return Path(name_or_path)


def expected_prefix(file_name: str, url: str) -> str:
    """The SHA-256 prefix a torchvision-style file name carries."""
    match = _HASH_IN_NAME.search(file_name)
    if match is None:
        raise UserError(f"{url}: the file name {file_name!r} carries no SHA-256 prefix "
                        "(expected NAME-<hex digits>.pth, as resnet18-f37072fd.pth)")
    return match.group(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached_download(url: str, *, progress: bool = True) -> Path:
    """The file at url, from the cache if a verified copy is there, else downloaded into it."""
    file_name = Path(urllib.parse.urlparse(url).path).name
    prefix = expected_prefix(file_name, url)
    target = cache_dir() / file_name
    if target.is_file():
        if sha256_of(target).startswith(prefix):
            return target
        raise UserError(f"{target}: its SHA-256 does not start with {prefix} (a damaged or "
                        "different file); delete it to download it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    # Imported here, not at the top: with urllib.request 0.1-0.2 s of imports, which cache_dir's users
    # (predict) skip. A name of its own: `import urllib.error` would make `urllib` local to this function.
    from urllib.error import URLError

    try:
        _download(url, partial, progress)
    except (URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {url} ({getattr(error, 'reason', error)}). Without internet "
            f"access, fetch {file_name} elsewhere and put it at {target} (the cache: "
            f"${CACHE_VARIABLE}, else ~/.cache/arm-jax), or pass the file's path instead") from None
    digest = sha256_of(partial)
    if not digest.startswith(prefix):
        partial.unlink()
        raise UserError(f"{url}: downloaded file refused: its SHA-256 {digest[:16]}... does not "
                        f"start with {prefix}, as its name says")
    os.replace(partial, target)
    return target


def _download(url: str, destination: Path, progress: bool) -> None:
    """Stream url into destination with a byte progress bar."""
    import urllib.request

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, \
            open(destination, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.stem}",
                  disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
