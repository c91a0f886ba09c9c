"""Three ways to run the steps with the same global-batch semantics.

- 'none': one device, `jax.jit`.
- 'pmap': `jax.pmap` over the local devices with axis 'batch'; the model is built with
  axis_name='batch' so BatchNorm statistics and the GAR are averaged over all devices, and
  gradients are pmean'd (steps.py). State is stacked, one copy per local device.
- 'jit': `jax.jit` over a 1-D mesh of all devices, batch sharded along 'batch', state
  replicated. Means over the sharded batch are global, so the model needs no axis name.

In all three, BatchNorm, the GAR and the loss see the WHOLE global batch, so one step gives
the same parameters whichever way it ran (tests/test_parallel.py). Batches arrive as numpy
dicts holding this process's share of the global batch ('local'), or the whole batch on
every process ('global': evaluation, whose loader is not sharded).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from arm_jax.errors import UserError
from arm_jax.models import with_runtime
from arm_jax.training.distributed import barrier
from arm_jax.xla_flags import training_compiler_options

AXIS = "batch"
MODES = ("none", "pmap", "jit")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How steps are compiled and where states and batches live, for one mode."""

    mode: str
    mesh: Mesh  # 'jit': all devices; 'pmap': this process's devices; 'none': one device

    @property
    def axis_name(self) -> str | None:
        """The name the model averages over (pmap only)."""
        return AXIS if self.mode == "pmap" else None

    @property
    def device_count(self) -> int:
        """Devices a global batch is split over."""
        return jax.device_count() if self.mode != "none" else 1

    def model(self, model):
        """The model as this mode runs it (axis_name set for pmap)."""
        return with_runtime(model, axis_name=self.axis_name)

    def check_batch_size(self, batch_size: int, option: str) -> None:
        """A global batch must split evenly over the devices and processes."""
        if batch_size % self.device_count:
            raise UserError(f"option {option}: {batch_size} does not split evenly over "
                            f"{self.device_count} devices (--parallel {self.mode})")

    # -- state ------------------------------------------------------------------------------

    def put_state(self, host_state):
        """Host (numpy) state -> device state: replicated, or stacked for pmap."""
        if self.mode == "pmap":
            n = len(self.mesh.devices.flat)
            sharding = NamedSharding(self.mesh, P(AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding),
                host_state)
        sharding = NamedSharding(self.mesh, P())
        # make_array_from_callback also works with several processes (each holds the same copy).
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
            host_state)

    def host_state(self, state):
        """Device state -> numpy (the first copy under pmap), for checkpoints and tests."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], state)
        return jax.tree.map(np.asarray, state)

    def snapshot(self, state):
        """A copy of the device state that the next step, which donates its input, leaves
        intact: a checkpoint can be read from it while training goes on. (Enqueued after the
        step that made `state`; the copy runs on the device, the host does not wait.)"""
        return _copy(state)

    def fetch(self, metrics) -> dict:
        """Device metrics (global sums, replicated) -> numpy."""
        return self.host_state(metrics)

    # -- batches ----------------------------------------------------------------------------

    def put_batch(self, batch: dict, *, whole: bool = False):
        """A numpy batch -> device arrays sharded over the devices.

        whole=False: `batch` is this process's share of the global batch (training);
        whole=True: every process holds the whole global batch (evaluation).
        """
        if self.mode == "none":
            return jax.device_put(batch, self.mesh.devices.flat[0])
        if self.mode == "pmap":
            if whole and jax.process_count() > 1:
                share = len(next(iter(batch.values()))) // jax.process_count()
                start = jax.process_index() * share
                batch = {k: v[start:start + share] for k, v in batch.items()}
            n = len(self.mesh.devices.flat)
            sharding = NamedSharding(self.mesh, P(AXIS))
            return {k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), sharding)
                    for k, v in batch.items()}
        sharding = NamedSharding(self.mesh, P(AXIS))
        if whole:
            return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                    for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def splits_evenly(self, batch: dict) -> bool:
        """Whether a whole (eval) batch can be sharded over the devices."""
        return len(next(iter(batch.values()))) % self.device_count == 0

    # -- steps ------------------------------------------------------------------------------

    @property
    def _pmap_devices(self) -> list | None:
        """pmap's devices: with several processes None, i.e. every process's devices, so the
        'batch' axis (pmean of gradients, BN statistics, GAR) spans them all; a list of this
        process's devices would average within each process only."""
        return None if jax.process_count() > 1 else list(self.mesh.devices.flat)

    def compile_train(self, train_step: Callable, largest_intermediate_bytes: int | None = None) -> Callable:
        """train_step(state, batch, rng) compiled for this mode; the input state is donated.

        'none' and 'jit' compile with xla_flags.training_compiler_options(largest_intermediate_bytes)
        (faster filter gradients and fewer page faults on the CPU); jax.pmap takes no compiler
        options, so 'pmap' runs without them.
        """
        if self.mode == "pmap":
            return _meet_after_compiling(jax.pmap(train_step, axis_name=AXIS, in_axes=(0, 0, None),
                                                  devices=self._pmap_devices, donate_argnums=0),
                                         ahead=False)
        options = training_compiler_options(largest_intermediate_bytes)
        if self.mode == "jit":
            # The updated state stays replicated, like the state that came in.
            return _meet_after_compiling(jax.jit(train_step, donate_argnums=0, compiler_options=options,
                                                 out_shardings=NamedSharding(self.mesh, P())))
        return jax.jit(train_step, donate_argnums=0, compiler_options=options)

    def compile_eval(self, make_eval_step: Callable) -> Callable:
        """evaluate(state, numpy whole batch) -> numpy metrics, for any batch size.

        `make_eval_step(axis_name)` builds the step. A batch that does not split evenly over
        the devices (the last, smaller eval batch) is NOT padded, since padding would change
        a batch GAR: it runs whole on every device (pmap: on the first copy, with a plain jit).
        """
        if self.mode == "pmap":
            sharded = _meet_after_compiling(jax.pmap(make_eval_step(AXIS), axis_name=AXIS,
                                                     devices=self._pmap_devices), ahead=False)
            single = jax.jit(make_eval_step(None))
            device = self.mesh.devices.flat[0]

            def evaluate(state, batch):
                if self.splits_evenly(batch):
                    metrics = sharded(state, self.put_batch(batch, whole=True))
                    logits = metrics.pop("logits")
                    out = self.fetch(metrics)
                    if jax.process_count() == 1:
                        out["logits"] = np.asarray(logits).reshape(-1, logits.shape[-1])
                    return out
                first = jax.device_put(self.host_state(state), device)
                return jax.tree.map(np.asarray, single(first, jax.device_put(batch, device)))

            return evaluate

        step = _meet_after_compiling(jax.jit(make_eval_step(None)))
        replicated = NamedSharding(self.mesh, P())

        def evaluate(state, batch):
            if self.mode == "none" or self.splits_evenly(batch):
                device_batch = self.put_batch(batch, whole=True)
            else:
                device_batch = {k: jax.make_array_from_callback(v.shape, replicated, lambda i, v=v: v[i])
                                for k, v in batch.items()}
            metrics = step(state, device_batch)
            logits = metrics.pop("logits")  # sharded over the batch: not gathered here
            out = jax.tree.map(np.asarray, metrics)
            if logits.is_fully_addressable:
                out["logits"] = np.asarray(logits)
            return out

        return evaluate


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _meet_after_compiling(compiled_lazily: Callable, *, ahead: bool = True) -> Callable:
    """With several processes: compile each new input signature ahead, wait for all the
    processes (distributed.barrier), then run. Compilation times differ between processes
    by more than the 30 s gloo gives them to meet at a new collective. One process: as is.
    ahead=False (pmap across processes, whose AOT executable refuses the local arrays):
    only meet before the first call of each signature."""
    if jax.process_count() < 2:
        return compiled_lazily
    executables = {}

    def run(*args):
        signature = str(jax.tree.map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x))),
                                               str(getattr(x, "sharding", ""))), args))
        if signature not in executables:
            executables[signature] = compiled_lazily.lower(*args).compile() if ahead else compiled_lazily
            barrier("compiled")
        return executables[signature](*args)

    return run


def make_parallel(mode: str) -> Parallel:
    """The Parallel for `mode` ('none' | 'pmap' | 'jit') over the devices jax sees."""
    if mode not in MODES:
        raise UserError(f"option parallel: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        if jax.process_count() > 1:
            raise UserError("--parallel none runs on one device; use jit or pmap with several hosts")
        devices = jax.local_devices()[:1]
    elif mode == "pmap":
        devices = jax.local_devices()
    else:
        devices = jax.devices()
    # Auto axes: shardings propagate through the step as with the classic jit API (this jax
    # defaults make_mesh to Explicit axes, which would need sharding-aware code throughout).
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    return Parallel(mode, mesh)
