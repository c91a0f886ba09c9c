"""A checkpoint as a classifier of uint8 face crops, in JAX, with a persistent compilation cache.

Kept apart from arm_jax.inference.predict so that predicting with an exported
.onnx model never imports JAX. The weights are arguments of one exported program
per architecture (arm_jax.inference.programs): on a second call with a training
workdir, neither flax nor a trace of the model is needed, and the compiled code
comes from JAX's persistent cache whichever checkpoint of that architecture it is.
"""

import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from arm_jax.data.classes import canonical_names
from arm_jax.errors import UserError
from arm_jax.inference.programs import ProgramCache, export_inference, program_key, variables_shapes
from arm_jax.interop.downloads import cache_dir

COMPILE_CACHE_SUBDIR = "jax-compile"
MODEL_DIRECTORY_FILE = "model.json"  # arm_jax.interop.model_files.MODEL_FILE, named here to avoid importing flax


def enable_compilation_cache() -> str:
    """Cache compiled programs on disk ($ARM_JAX_CACHE/jax-compile, else ~/.cache/arm-jax/jax-compile).

    A folder already chosen (JAX_COMPILATION_CACHE_DIR, or a caller's jax.config) is kept.
    JAX reads the setting at its first compilation, so this runs before anything compiles.
    """
    if not jax.config.jax_compilation_cache_dir:
        directory = cache_dir() / COMPILE_CACHE_SUBDIR
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
    return jax.config.jax_compilation_cache_dir


def gar_calibrated(architecture: dict[str, Any], variables: dict[str, Any]) -> bool:
    """LoadedModel.gar_calibrated from the architecture's fields (no flax model needed)."""
    return not architecture["affinity"] or int(variables["gar"]["arm"]["affinity"]["count"]) > 0


def load_for_inference(checkpoint: Path, shapes_for) -> tuple[dict[str, Any], tuple[str, ...] | None, Any]:
    """(architecture fields, class names, variables on the device) of anything load_any_model reads.

    A training workdir is read without flax or orbax (arm_jax.training.checkpoint_reading);
    `shapes_for` as load_any_model's.
    """
    if checkpoint.is_dir() and not (checkpoint / MODEL_DIRECTORY_FILE).is_file():
        from arm_jax.training.checkpoint_reading import load_model_from_checkpoint

        architecture, names, variables = load_model_from_checkpoint(checkpoint, shapes_for=shapes_for)
        return architecture, canonical_names(names, "the model's classes"), variables
    from arm_jax.interop.model_files import load_any_model
    from arm_jax.models import architecture as architecture_of

    loaded = load_any_model(checkpoint, shapes_for=shapes_for)
    return architecture_of(loaded.model), loaded.class_names, jax.device_put(loaded.variables)


class JaxClassifier:
    """A model as load_any_model reads it + the running GAR; `probabilities` takes uint8 (N, S, S, 3) at its size.

    Each batch size (a power of two) runs its own executable, loaded from the program cache
    or compiled once; `warm_in_background` prepares sizes in a thread while smaller ready
    ones answer.
    """

    def __init__(self, checkpoint: str | Path):
        programs = ProgramCache(enable_compilation_cache())
        found: dict[str, Any] = {}

        def shapes_for(architecture: dict[str, Any]) -> Any:
            """The cached program's variables, or None (then the model's init is traced)."""
            found["key"] = program_key(architecture)
            found["program"] = programs.program(found["key"])
            return variables_shapes(found["program"]) if found["program"] is not None else None

        architecture, names, variables = load_for_inference(Path(checkpoint), shapes_for)
        if not gar_calibrated(architecture, variables):
            raise UserError(f"{checkpoint}: has no running GAR, so a prediction would depend on the other images; "
                            "run `arm-jax calibrate` on it first")
        program = found.get("program")
        if program is None:  # first use of this architecture (or a .pth file): export and keep it
            from arm_jax.models import ARMResNet18

            program = export_inference(ARMResNet18(**architecture), variables)
            programs.store_program(found.get("key") or program_key(architecture), program)
        self.class_names = names or tuple(f"class_{i}" for i in range(architecture["num_classes"]))
        self.image_size = int(architecture["image_size"])
        self._programs, self._program, self._variables = programs, program, variables
        self._compiled: dict[int, Any] = {}
        self._warming: set[int] = set()  # sizes a background thread is still preparing
        self._compiling = threading.Lock()  # one compilation at a time; answering never waits on it

    def compiled_for(self, batch: int):
        """The program compiled for `batch` images (loaded from the cache, else compiled there), once per size."""
        compiled = self._compiled.get(batch)
        if compiled is None:
            with self._compiling:
                compiled = self._compiled.get(batch)
                if compiled is None:
                    compiled = self._programs.compiled(self._program, self._variables, batch)
                    self._compiled[batch] = compiled
        return compiled

    def warm_in_background(self, sizes: list[int], done=None) -> threading.Thread:
        """Prepare `sizes` in a daemon thread, then call done(seconds); meanwhile a batch of a size
        not ready yet is answered in slices of the largest ready size."""
        self._warming.update(sizes)

        def warm() -> None:
            start = time.perf_counter()
            for size in sizes:
                self.compiled_for(size)
                self._warming.discard(size)
            if done is not None:
                done(time.perf_counter() - start)

        thread = threading.Thread(target=warm, name="warm-up", daemon=True)
        thread.start()
        return thread

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        """(N, classes) float32. Batches are padded to a power of two so that few shapes ever compile."""
        count = len(faces)
        padded = 1 << max(count - 1, 0).bit_length()
        if padded in self._warming:
            ready = [size for size in list(self._compiled) if size < padded]
            if ready:  # slices of a ready size rather than waiting for this one's compilation
                step = max(ready)
                return np.concatenate([self.probabilities(faces[i : i + step]) for i in range(0, count, step)])
        if padded > count:  # blank images: with the running GAR they change nobody's answer
            faces = np.concatenate([faces, np.zeros((padded - count,) + faces.shape[1:], faces.dtype)])
        _, probabilities = self.compiled_for(padded)(self._variables, faces)
        return np.asarray(probabilities)[:count]
