"""One training step gives the same state with --parallel none, pmap and jit (4 CPU devices).

The step runs in float64 (parameters and computation): in float32 the three ways round
differently (convolutions over a batch of 2 per device vs 8), and at initialisation, with
BatchNorm over 8 random images, the early layers' gradients amplify that rounding to ~1e-2
of their update (measured). In float64 they agree to ~1e-14 (after Adam, ~5e-11), which a real difference in
semantics (e.g. BatchNorm statistics per device instead of global) could not.

The comparison runs in a subprocess (this file as a script) because the 4 simulated
devices must be requested before jax is imported, and the test process has jax already.
"""

import json
import os
import subprocess
import sys

import pytest

# 96: the smallest size whose GAR is a map (3x3) rather than a single BN-normalised value.
IMAGE_SIZE, BATCH, CLASSES, DEVICES = 96, 8, 7, 4
# Max abs difference relative to the largest magnitude of each array, in float64.
TOLERANCE = 1e-9  # observed: 5e-11 (Adam divides tiny gradients by their own size)


def _run_modes() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from arm_jax.training.config import TrainConfig
    from arm_jax.training.optim import make_optimizer
    from arm_jax.models import ARMResNet18, with_runtime
    from arm_jax.training.parallel import make_parallel
    from arm_jax.training.state import TrainState
    from arm_jax.training.steps import make_eval_step, make_train_step

    assert jax.device_count() == DEVICES
    assert jax.config.jax_enable_x64
    model = ARMResNet18(num_classes=CLASSES, image_size=IMAGE_SIZE, dtype=jnp.float64,
                        param_dtype=jnp.float64)
    x = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float64)
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    tx = make_optimizer(TrainConfig(), steps_per_epoch=10)
    host = jax.tree.map(np.asarray, TrainState.create(variables, tx))
    rng = np.random.default_rng(0)
    batch = {  # 48x48 gray images, resized to 64 inside the step; two erased
        "image": rng.integers(0, 256, (BATCH, 48, 48, 1), dtype=np.uint8),
        "label": rng.integers(0, CLASSES, (BATCH,), dtype=np.int32),
        "erase": np.array([[4, 4, 10, 20], [0, 0, 5, 5]] + [[0, 0, 0, 0]] * (BATCH - 2), np.int32),
    }
    out = {}
    for mode in ("none", "pmap", "jit"):
        par = make_parallel(mode)
        m = par.model(model)
        step = par.compile_train(make_train_step(m, tx, image_size=IMAGE_SIZE))
        evaluate = par.compile_eval(lambda axis: make_eval_step(
            with_runtime(model, axis_name=axis), image_size=IMAGE_SIZE))
        new, metrics = step(par.put_state(host), par.put_batch(batch), jax.random.key(1))
        state = par.host_state(new)
        out[mode] = {"state": state, "metrics": par.fetch(metrics),
                     "eval": evaluate(par.put_state(state), batch)}
    diffs = {}
    for mode in ("pmap", "jit"):
        for part in ("state", "metrics", "eval"):
            ref, got = out["none"][part], out[mode][part]
            rel = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                                                  / max(np.max(np.abs(a)), 1e-12)), ref, got)
            diffs[f"{mode}/{part}"] = max(jax.tree.leaves(rel))
    # A change that the step did make (so equal outputs are not trivially equal).
    diffs["step_moved_params"] = min(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), host.params, out["none"]["state"].params)))
    diffs["eval_count"] = int(out["jit"]["eval"]["count"])
    diffs["step"] = int(out["pmap"]["state"].step)
    return diffs


@pytest.mark.slow
def test_none_pmap_jit_give_the_same_step():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    print(diffs)
    assert diffs["step"] == 1
    assert diffs["step_moved_params"] > 0  # every parameter array moved
    assert diffs["eval_count"] == BATCH
    for key, value in diffs.items():
        if "/" in key:
            assert value <= TOLERANCE, (key, value, diffs)


if __name__ == "__main__":
    print(json.dumps(_run_modes()))
