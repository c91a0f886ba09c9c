"""Readers: one module per distributed data set format, each returning `base.Records`."""

from pathlib import Path

from arm_jax.errors import DatasetError


def require(path: Path, dataset: str, how_to_get: str, layout: str) -> Path:
    """Return path if it exists, else a DatasetError saying where to get the data set."""
    if not path.exists():
        raise DatasetError(f"{dataset}: {path} not found.\n{how_to_get}\nExpected layout:\n"
                           f"{layout}")
    return path
