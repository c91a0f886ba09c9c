"""XLA:CPU tuning: a flag `configure_cpu()` sets in `XLA_FLAGS` before JAX starts its backend
(the `arm-jax` command calls it; importing arm_jax does not), and the compiler options its
training steps are compiled with.

jaxlib 0.10 sends float32 convolutions to YNNPACK, whose filter-gradient convs
run several times slower than Eigen's on the ResNet-18 training step (measured:
training 0.40x -> 0.77x PyTorch's images/s on 2 cores). Removing
`individual_convolution` from the YNN fusion types gives convolutions back to
Eigen and keeps YNNPACK for dots and reductions. Off switches: set
`ARM_JAX_XLA_CPU_TUNING=0`, or give the flag yourself in `XLA_FLAGS` (your value
wins). XLA aborts on a flag or value it does not know, so the flag is only added
where the running jaxlib's library contains both names.

The training step's compiler options (`training_compiler_options`) keep the
optimization barriers that the model puts on each convolution's input
(models/conv.py `materialized`) and split its temporaries into blocks that glibc
keeps between steps; `ARM_JAX_XLA_CPU_TUNING=0` drops them too.
"""

import importlib.util
import mmap
import os
import warnings
from pathlib import Path

from arm_jax.compat import jax_backend_started

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_VALUE = "-individual_convolution"
TUNING_ENV = "ARM_JAX_XLA_CPU_TUNING"
# The names a jaxlib must carry for the flag and its value to parse (flag name, enum value).
_REQUIRED_NAMES = (b"xla_cpu_experimental_ynn_fusion_type", b"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
# jaxlib's native library: libjax_common.so since 0.5, xla_extension.so before.
_JAXLIB_LIBRARIES = ("libjax_common.so", "xla_extension.so", "libjax_common.dylib", "xla_extension.dylib")


def merged_xla_flags(xla_flags: str | None, tuning: str | None, jaxlib_knows_flag: bool) -> str | None:
    """The `XLA_FLAGS` value to run with: `xla_flags` plus the YNN flag unless the user opted out or set it."""
    if not jaxlib_knows_flag or _opted_out(tuning):
        return xla_flags
    existing = (xla_flags or "").split()
    if any(entry == YNN_FUSION_FLAG or entry.startswith(YNN_FUSION_FLAG + "=") for entry in existing):
        return xla_flags
    return " ".join([*existing, f"{YNN_FUSION_FLAG}={YNN_FUSION_VALUE}"])


def _opted_out(tuning: str | None) -> bool:
    """Whether ARM_JAX_XLA_CPU_TUNING's value turns the tuning off."""
    return (tuning or "").strip().lower() in ("0", "false", "no", "off")


def jaxlib_knows_ynn_flag() -> bool:
    """Whether the installed jaxlib's native library names the flag and its value (a ~20 ms scan)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for name in _JAXLIB_LIBRARIES:
            library = Path(folder) / name
            if library.is_file():
                return _contains_all(library, _REQUIRED_NAMES)
    return False


def _contains_all(path: Path, needles: tuple[bytes, ...]) -> bool:
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return all(data.find(needle) >= 0 for needle in needles)


def configure_cpu() -> None:
    """Add the YNN flag to `os.environ["XLA_FLAGS"]` where it applies (see the module docstring).
    Call it before JAX starts its backend (the first computation or device query): JAX reads
    `XLA_FLAGS` once, so a later call changes nothing and warns.
    """
    tuning, current = os.environ.get(TUNING_ENV), os.environ.get("XLA_FLAGS")
    if merged_xla_flags(current, tuning, True) == current:
        return  # opted out, or set by the user: skip the library scan
    if jax_backend_started():  # JAX read XLA_FLAGS already: a change does nothing now
        warnings.warn("arm_jax.configure_cpu() was called after JAX started its backend, which has read "
                      "XLA_FLAGS already: call it before the first JAX computation", stacklevel=2)
        return
    merged = merged_xla_flags(current, tuning, jaxlib_knows_ynn_flag())  # a ~20 ms scan of jaxlib
    if merged is not None and merged != current:
        os.environ["XLA_FLAGS"] = merged


# XLA's OptimizationBarrierExpander, by its pass name: it removes optimization barriers
# before fusion. An unknown name in xla_disable_hlo_passes is ignored, so a jaxlib that
# renames the pass compiles as without the option.
BARRIER_EXPANDER_PASS = "cse_barrier_expander"


# XLA:CPU allocates a program's temporaries as one block per execution (162 MB for the
# 112 px training step, batch 32). glibc serves a block above its mmap threshold (at most
# 32 MiB on 64-bit) with a fresh mmap, unmapped again on free, so each step faulted in every
# page of it anew: ~40,000 page faults and ~70 ms of kernel CPU per step. XLA's multi-heap
# option splits the temporaries into blocks of at most this size, which glibc keeps and
# reuses. Only while every intermediate fits in a block: a larger one gets a block of its
# own, mapped anew each step, and loses the space it shared in the single block (measured at
# 224 px, batch 32, 102 MB activations: more faults, a slower step). And only without JAX's
# persistent compilation cache: XLA:CPU cannot serialize an executable whose temporaries are
# in several blocks ("Multiple temp buffer allocations found"), so the cache could not keep
# the step and JAX would warn at every compilation.
TEMP_BLOCK_BYTES = 32 << 20


def training_compiler_options(largest_intermediate_bytes: int | None = None) -> dict | None:
    """`compiler_options` for `jax.jit` of a training step: on the CPU backend, keep the
    barriers on convolution inputs (see models/conv.py `materialized`) and, where the step's
    largest intermediate (in bytes, if known) fits and the persistent compilation cache is
    off, allocate the temporaries in blocks of at most TEMP_BLOCK_BYTES; elsewhere None.

    Why per compilation and not in XLA_FLAGS: the options then reach only the steps
    compiled with them, never other programs in the process or other backends.
    """
    import jax

    if jax.default_backend() != "cpu" or _opted_out(os.environ.get(TUNING_ENV)):
        return None
    options = {"xla_disable_hlo_passes": BARRIER_EXPANDER_PASS}
    fits = largest_intermediate_bytes is not None and largest_intermediate_bytes <= TEMP_BLOCK_BYTES
    if fits and not jax.config.jax_compilation_cache_dir:
        options["xla_multiheap_size_constraint_per_heap"] = str(TEMP_BLOCK_BYTES)
    return options
