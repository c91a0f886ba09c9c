"""Shared test set-up: one JAX compilation cache per session, `--reverse`, shared fixtures.

Tiers: `python -m pytest -q` runs everything (as CI does); `python -m pytest -q -m "not slow"`
is the fast tier. `--reverse` runs the collected tests in reverse order, to show that no
test depends on another having run first.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

# Compilations shorter than this are not worth a disk write (most small jits are).
_CACHE_MIN_COMPILE_SECONDS = 0.2


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", help="run the collected tests in reverse order")
    parser.addoption("--jax-cache-dir", default=None,
                     help="persistent JAX compilation cache (default: a fresh temporary folder per session)")


def pytest_configure(config):
    """Set the persistent compilation cache once, before anything compiles.

    JAX reads the cache settings once per process (at its first compilation), so a
    per-module setting is ignored after the first module; here it is set once for the
    session, and exported so that subprocesses the tests start (the CLI, scripts) share it.
    """
    import jax

    directory = config.getoption("--jax-cache-dir")
    if directory is None:
        directory = tempfile.mkdtemp(prefix="arm-jax-test-jax-cache-")
        config._arm_jax_cache_to_remove = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(_CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)


def pytest_unconfigure(config):
    directory = getattr(config, "_arm_jax_cache_to_remove", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test (never shared, so no test sees another's draws)."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def torch_reference():
    """The PyTorch reference models (tests/torch_reference.py); skips the test without PyTorch."""
    pytest.importorskip("torch")
    from tests import torch_reference

    return torch_reference
