"""Shared test set-up: one JAX compilation cache per session, `--reverse`, shared fixtures.

Tiers: `python -m pytest -q` runs everything (as CI does); `python -m pytest -q -m "not slow"`
is the fast tier. `--reverse` runs the collected tests in reverse order, to show that no
test depends on another having run first.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile

import numpy as np
import pytest

# Compilations shorter than this are not worth a disk write (most small jits are).
_CACHE_MIN_COMPILE_SECONDS = 0.2
_SHARED_CACHE_VARIABLE = "ARM_JAX_TEST_JAX_CACHE_DIR"


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", help="run the collected tests in reverse order")
    parser.addoption("--jax-cache-dir", default=None,
                     help="persistent JAX compilation cache (default: a fresh temporary folder per session)")
    parser.addoption("--cpu-durations", type=int, default=0, metavar="N",
                     help="list the N tests that used the most CPU time (setup + call, subprocesses included): "
                          "unlike wall time, it hardly changes when other programs load the machine")


def pytest_configure(config):
    """Set the persistent compilation cache once, before anything compiles.

    JAX reads the cache settings once per process (at its first compilation), so a
    per-module setting is ignored after the first module; here it is set once for the
    session, and exported so that subprocesses the tests start (the CLI, scripts) share it.
    """
    import arm_jax

    arm_jax.configure_cpu()  # the XLA:CPU tuning the arm-jax command applies, before JAX starts here
    import jax

    # Under pytest-xdist the controller configures first and its workers inherit its
    # environment: they share its cache, so a program one worker compiled (the same model
    # sizes recur across test files) is loaded, not compiled again, by the other.
    directory = config.getoption("--jax-cache-dir") or os.environ.get(_SHARED_CACHE_VARIABLE)
    if directory is None:
        directory = tempfile.mkdtemp(prefix="arm-jax-test-jax-cache-")
        config._arm_jax_cache_to_remove = directory
        os.environ[_SHARED_CACHE_VARIABLE] = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(_CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)
    config._arm_jax_cpu_seconds = {}


def pytest_unconfigure(config):
    directory = getattr(config, "_arm_jax_cache_to_remove", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_seconds()
    try:
        return (yield)
    finally:
        item.config._arm_jax_cpu_seconds[item.nodeid] = _cpu_seconds() - start


def pytest_terminal_summary(terminalreporter, config):
    count = config.getoption("--cpu-durations")
    if count:
        used = config._arm_jax_cpu_seconds
        terminalreporter.section(f"CPU time: {sum(used.values()):.0f} s in all; the top {count}")
        for nodeid, seconds in sorted(used.items(), key=lambda kv: -kv[1])[:count]:
            terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")


# The longest files first (measured in one process on 2 cores: test_train ~8 min, test_faults ~4.6,
# test_parallel ~4.3, test_distributed ~3.2): with xdist's `--dist loadfile` a worker takes whole
# files in this order, and a long file taken last would run on alone at the end. pyproject's
# `--no-loadscope-reorder` keeps this order: by default xdist reorders files by their number of
# tests, which put test_parallel (2 tests, ~5 min) last, alone (CI 25 min 12 s, tests 22 min 57 s).
_LONGEST_FIRST = ("test_train.py", "test_faults.py", "test_parallel.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    longest = _LONGEST_FIRST
    if config.getoption("--reverse"):
        items.reverse()
        longest = longest[::-1]
    rank = {name: index for index, name in enumerate(longest)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the order within


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test (never shared, so no test sees another's draws)."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def torch_reference():
    """The PyTorch reference models (arm_jax/interop/torch_reference.py); skips the test without PyTorch."""
    pytest.importorskip("torch")
    from arm_jax.interop import torch_reference

    return torch_reference
