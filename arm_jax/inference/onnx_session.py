"""onnxruntime sessions that start quickly: the graph onnxruntime optimised is kept in the cache.

Creating a session optimises the graph (fusing Conv+BN, NCHWc layouts for this
CPU) each time: about half of its 0.5-1 s on a 2-core machine. The first session
of a model saves its optimised graph to $ARM_JAX_CACHE/onnx-optimized (else
~/.cache/arm-jax/onnx-optimized; about the model's size, 45 MB at 224 px), and
later ones load it with the optimisations off: the same graph, so the same
kernels and the same answers, bit for bit (tests/test_predict_caches.py).
onnxruntime warns that such a graph may only suit the machine it was optimised
on, so the key holds the model file's content, the onnxruntime version and the CPU.
Nothing is written next to the model. This module does not import JAX.
"""

import hashlib
import logging
import os
import platform
from pathlib import Path

from arm_jax.interop.downloads import cache_dir

log = logging.getLogger(__name__)

OPTIMIZED_SUBDIR = "onnx-optimized"
ORT_ERROR = 3  # onnxruntime's log severity for errors only


def cpu_identity() -> str:
    """What code optimised for this machine depends on: the architecture, the CPU model and its extensions."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            details = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        details = [platform.processor()]
    return platform.machine() + "|" + "|".join(details)


def optimized_path(model: Path) -> Path:
    """Where the optimised graph of `model` on this machine with this onnxruntime is kept."""
    import onnxruntime

    with open(model, "rb") as file:  # sha1: the fastest of hashlib's (0.04-0.08 s for 45 MB); not a security check
        content = hashlib.file_digest(file, "sha1").hexdigest()
    described = f"{content}|{onnxruntime.__version__}|{cpu_identity()}".encode()
    return cache_dir() / OPTIMIZED_SUBDIR / f"{hashlib.sha256(described).hexdigest()[:32]}.onnx"


def session(model: str | Path):
    """An onnxruntime CPU session of `model`, from its cached optimised graph where there is one."""
    import onnxruntime

    model = Path(model)
    providers = ["CPUExecutionProvider"]
    try:
        cached = optimized_path(model)
    except OSError:  # unreadable: onnxruntime says why
        return onnxruntime.InferenceSession(str(model), providers=providers)
    if cached.is_file():
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return onnxruntime.InferenceSession(str(cached), options, providers=providers)
        except Exception as error:  # a truncated entry: optimise again and replace it
            log.warning("%s: unreadable cached graph, optimising %s again (%s)", cached, model, error)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = ORT_ERROR  # not its warning about machine-specific graphs: the key holds the CPU
    temporary = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.onnx")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(temporary)
        created = onnxruntime.InferenceSession(str(model), options, providers=providers)
        os.replace(temporary, cached)
        return created
    except OSError as error:
        log.warning("%s: cannot cache the optimised graph (%s)", cached.parent, error)
    except Exception:  # onnxruntime's own errors: let a plain session report them
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return onnxruntime.InferenceSession(str(model), providers=providers)
