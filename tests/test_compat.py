"""arm_jax/compat.py: the private parts of JAX and grain in one place, and a warning, once per
part, where the installed version is not the one they were written for."""

import importlib.metadata
import logging

from arm_jax import compat


def test_an_untested_version_is_warned_about_once_per_private_part(monkeypatch, caplog):
    installed = importlib.metadata.version("grain")
    monkeypatch.setattr(compat, "TESTED", {**compat.TESTED, "grain": "0.0"})
    monkeypatch.setattr(compat, "_warned", set())
    assert compat.untested_versions()["grain"] == installed
    with caplog.at_level(logging.WARNING, logger="arm_jax.compat"):
        compat.shared_memory_delete_pool()
        compat.shared_memory_delete_pool()
    warnings = [r.getMessage() for r in caplog.records if r.name == "arm_jax.compat"]
    assert len(warnings) == 1 and "grain's private SharedMemoryArray._del_thread_pool" in warnings[0]
    assert f"grain {installed} is installed" in warnings[0] and "install grain 0.0.x" in warnings[0]


def test_the_tested_versions_are_not_warned_about(monkeypatch, caplog):
    installed = {p: ".".join(importlib.metadata.version(p).split(".")[:2]) for p in compat.TESTED}
    monkeypatch.setattr(compat, "TESTED", installed)
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="arm_jax.compat"):
        compat.shared_memory_delete_pool()
    assert compat.untested_versions() == {} and not caplog.records
