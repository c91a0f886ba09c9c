"""The inference program of an architecture, kept on disk beside JAX's compilation cache.

A second `predict` on a checkpoint then needs neither flax nor a trace of the model:
- the program: `inference_fn` exported with jax.export (weights as arguments, batch
  size symbolic), keyed by what it is made of: the architecture, the source of the
  code that defines it, the JAX version and the platform. The weights are not part
  of it, so a retrained or recalibrated checkpoint uses the same entry with its own
  weights, and its shapes are the target the weights are restored into.
- its executable for one batch size on this machine, serialised with
  jax.experimental.serialize_executable, keyed by the program's StableHLO, the batch
  size, jaxlib, XLA_FLAGS, the devices and the CPU. Calling an exported program
  lowers it, and JAX's lowering of an exported call on CPU first initialises LAPACK,
  which imports scipy (measured 0.8-1.0 s of a 1.5-1.8 s first call on a loaded
  2-core machine; the executable loads in under 0.1 s). A missing executable is
  compiled from the program, through JAX's persistent compilation cache (one that
  came from there cannot be serialised again, see _reloadable: it is then compiled
  once more under a name of its own), and run once more from its bytes before
  they are written.

The folder is inside JAX's compilation cache folder (JAX's own cache reads only its
`*-cache` files there), never the model's folder. Like JAX's cache, whoever can write
that folder can make this process run code: an executable is machine code (and the
executable's wrapper a pickle), so the folder must be the user's own.
"""

import hashlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax

import arm_jax
from arm_jax.inference.onnx_session import cpu_identity  # JAX-free, shared with the ONNX path

log = logging.getLogger(__name__)

PROGRAM_CACHE_SUBDIR = "arm-jax-programs"
FORMAT = 1  # bump when what an entry holds changes
# The code an exported program is made of: the model, the forward pass, the preprocessing.
PROGRAM_SOURCES = ("models/*.py", "forward.py", "data/transforms.py")


def source_digest(package: Path | None = None) -> str:
    """sha256 of the PROGRAM_SOURCES files of `package` (arm_jax's folder): an edited model never reuses a program."""
    package = package or Path(arm_jax.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for pattern in PROGRAM_SOURCES for p in package.glob(pattern)):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _digest(described: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def program_key(architecture: dict[str, Any]) -> str:
    """The key of the inference program of `architecture` with this code, this JAX and this platform."""
    import jaxlib

    return _digest({"format": FORMAT, "architecture": architecture, "source": source_digest(),
                    "jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": jax.default_backend()})


def executable_key(exported: jax.export.Exported, batch: int) -> str:
    """The key of `exported`'s executable for `batch` images on this machine, with these XLA options.

    By the program's StableHLO, not by its cache key: a source edit that leaves the program
    as it was (which JAX's cache would supply) keeps its executable.
    """
    import jaxlib

    device = jax.devices()[0]
    module = hashlib.sha256(exported.mlir_module_serialized).hexdigest()
    return _digest({"module": module, "batch": batch, "jaxlib": jaxlib.__version__,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "device": [device.platform, device.device_kind, device.client.platform_version,
                               jax.device_count()], "cpu": cpu_identity()})


class ProgramCache:
    """Exported programs and their executables in a folder, one file per key."""

    def __init__(self, compilation_cache_dir: str | Path):
        self.directory = Path(compilation_cache_dir) / PROGRAM_CACHE_SUBDIR

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, name: str, content: bytes) -> None:
        """Atomically (another process may read the entry meanwhile); a failure only logs."""
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                file.write(content)
            os.replace(temporary, self.directory / name)
        except OSError as error:
            log.warning("%s: cannot cache %s (%s)", self.directory, name, error)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)

    def program(self, key: str) -> jax.export.Exported | None:
        """The exported program stored under `key`, or None (also for an unreadable entry, then rebuilt)."""
        content = self._read(f"{key}.jaxexport")
        if content is None:
            return None
        try:
            return jax.export.deserialize(bytearray(content))
        except Exception as error:  # a truncated or foreign file: export anew and replace it
            log.warning("%s: unreadable cached program, exporting again (%s)", self.directory / key, error)
            return None

    def store_program(self, key: str, exported: jax.export.Exported) -> None:
        self._write(f"{key}.jaxexport", exported.serialize())

    def compiled(self, exported: jax.export.Exported, variables: Any, batch: int):
        """`exported` compiled for `variables` and `batch` uint8 images: stored executable, else compiled and stored."""
        from jax.experimental import serialize_executable

        images = jax.ShapeDtypeStruct((batch, *exported.in_avals[-1].shape[1:]), exported.in_avals[-1].dtype)
        in_tree = jax.tree.structure(((variables, images), {}))
        out_tree = jax.tree.structure((0, 0))
        name = f"{executable_key(exported, batch)}.executable"
        content = self._read(name)
        if content is not None:
            try:
                return serialize_executable.deserialize_and_load(content, in_tree, out_tree)
            except Exception as error:  # from another jaxlib or machine after all: compile anew
                log.warning("%s: unusable cached executable, compiling again (%s)", self.directory / name, error)
        compiled = jax.jit(exported.call).lower(variables, images).compile()
        try:
            content = _reloadable(compiled, compiled, variables, images, in_tree, out_tree)
            if content is None:
                # JAX's persistent cache supplied `compiled`, which XLA:CPU cannot serialise again:
                # compile it once more under a name no cache holds (the same code, bit for bit).
                def call(variables, images):
                    return exported.call(variables, images)

                call.__name__ = f"arm_jax_fresh_{uuid.uuid4().hex}"
                fresh = jax.jit(call).lower(variables, images).compile()
                content = _reloadable(fresh, compiled, variables, images, in_tree, out_tree)
        except (ValueError, NotImplementedError) as error:  # a backend that cannot serialise: just not cached
            log.info("not caching the executable (%s)", error)
            return compiled
        if content is not None:
            self._write(name, content)
        return compiled


def _reloadable(compiled, reference, variables: Any, images: jax.ShapeDtypeStruct, in_tree, out_tree) -> bytes | None:
    """`compiled` serialised, if it loads back and computes what `reference` does, bit for bit; else None.

    XLA:CPU (jaxlib 0.10.2) serialises an executable that JAX's persistent cache supplied
    into bytes that load but fail when run ("Function add_rsqrt_fusion not found").
    """
    import numpy as np
    from jax.experimental import serialize_executable

    content = serialize_executable.serialize(compiled)[0]
    probe = np.random.default_rng(0).integers(0, 256, images.shape, np.uint8)
    try:
        reloaded = serialize_executable.deserialize_and_load(content, in_tree, out_tree)
        same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(
            jax.device_get(reference(variables, probe)), jax.device_get(reloaded(variables, probe))))
    except Exception as error:  # jax.errors.JaxRuntimeError and whatever a broken executable raises
        log.debug("a serialised executable does not reload (%s)", error)
        return None
    if not same:
        log.warning("not caching an executable: reloaded, it computes other values")
    return content if same else None


def export_inference(model, variables_shapes: Any) -> jax.export.Exported:
    """jax.export of inference_fn(model) for variables of `variables_shapes`, uint8 images of any batch size."""
    from arm_jax.forward import inference_fn  # flax and the model: only when exporting

    size = model.image_size
    (batch,) = jax.export.symbolic_shape("N")
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.uint8)
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables_shapes)
    return jax.export.export(jax.jit(inference_fn(model)))(variables, images)


def variables_shapes(exported: jax.export.Exported) -> Any:
    """The tree of ShapeDtypeStructs an exported program takes as its variables (its first argument)."""
    (variables, _images), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
