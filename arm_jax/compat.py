"""The private parts of JAX and grain that arm-jax relies on, all in this module.

Each function below says what it works around and what happens where the private part is
gone. They were written against jax 0.10 and grain 0.2 (`TESTED`); with another minor version
installed, the first use of each logs a warning naming it, so that a failure after an upgrade
points here. Nothing else in the package imports `jax._src` or touches grain's private
attributes (tests/test_layers.py checks the source).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import sys

log = logging.getLogger(__name__)

# package -> the major.minor its private parts below were written and tested against
TESTED = {"jax": "0.10", "grain": "0.2"}
_warned: set[str] = set()


@functools.cache
def _installed(package: str) -> str | None:
    """The installed version of `package` (read once per process: the calls below sit on barriers
    and loader closes), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def untested_versions() -> dict[str, str]:
    """{package: installed version} for installed packages whose major.minor is not `TESTED`'s."""
    found = {}
    for package, tested in TESTED.items():
        installed = _installed(package)
        if installed is not None and ".".join(installed.split(".")[:2]) != tested:
            found[package] = installed
    return found


def _using(package: str, what: str) -> None:
    """Warn once per private part when `package`'s installed minor version is not the tested one."""
    installed = untested_versions().get(package)
    if installed is not None and what not in _warned:
        _warned.add(what)
        log.warning("arm-jax uses %s's private %s, written for %s %s.x; %s %s is installed: if this "
                    "misbehaves, install %s %s.x (arm_jax/compat.py says what it works around)",
                    package, what, package, TESTED[package], package, installed, package, TESTED[package])


# ---- JAX ----------------------------------------------------------------------------------------

def jax_backend_started() -> bool:
    """Whether JAX has created a backend (it reads XLA_FLAGS then, once). JAX has no public
    question for this that does not itself start a backend; read from the module's state
    without importing it (absent or renamed: False, so XLA_FLAGS is still set)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    _using("jax", "xla_bridge._backends")
    return bool(getattr(bridge, "_backends", None))


def distributed_client():
    """The coordination-service client of `jax.distributed.initialize()`, or None: its named
    barriers and live-process query have no public API. Used for the barriers between
    processes and to name the process that died."""
    _using("jax", "distributed.global_state.client")
    from jax._src import distributed

    return distributed.global_state.client


# ---- grain --------------------------------------------------------------------------------------

def close_grain_iterator(iterator) -> bool:
    """Shut down the worker processes of a grain DataLoader iterator now (grain has no public
    close: they would otherwise live until the iterator is collected). False where the
    iterator has no closable inner iterator (0 workers, or grain changed)."""
    _using("grain", "DataLoader iterator._iterator.close")
    inner = getattr(iterator, "_iterator", None)
    if not hasattr(inner, "close"):
        return False
    inner.close()
    return True


def shared_memory_delete_pool():
    """The thread pool grain unlinks worker batches' shared memory with
    (`SharedMemoryArray.enable_async_del`), or None where grain has none by that name: holding
    it orders a collection before the unlinks (data/pipeline.py `release_worker_batches`)."""
    _using("grain", "SharedMemoryArray._del_thread_pool")
    from grain.multiprocessing import SharedMemoryArray

    return getattr(SharedMemoryArray, "_del_thread_pool", None)
