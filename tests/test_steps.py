"""The pure steps: training lowers the loss on a fixed batch; bf16 keeps float32 state."""

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.training.config import TrainConfig
from arm_jax.interop.pretrained import init_variables
from arm_jax.models import ARMResNet18
from arm_jax.training.optim import make_optimizer
from arm_jax.training.state import TrainState
from arm_jax.training.steps import make_eval_step, make_train_step

SIZE, BATCH = 96, 8


def _setup(dtype):
    model = ARMResNet18(num_classes=7, image_size=SIZE, dtype=dtype)
    variables = init_variables(ARMResNet18(num_classes=7, image_size=SIZE), jax.random.key(0))
    tx = make_optimizer(TrainConfig(), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (BATCH, 48, 48, 1), dtype=np.uint8),
             "label": np.arange(BATCH, dtype=np.int32) % 7,
             "erase": np.zeros((BATCH, 4), np.int32)}
    return model, tx, TrainState.create(variables, tx), batch


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model, tx, state, batch = _setup(jnp.float32)
    step = jax.jit(make_train_step(model, tx, image_size=SIZE))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(1))
        assert int(metrics["count"]) == BATCH
        losses.append(float(metrics["loss_sum"]) / BATCH)
    assert int(state.step) == 4
    assert losses[-1] < 0.5 * losses[0], losses
    # Evaluation mutates nothing and agrees with its own counts.
    out = jax.jit(make_eval_step(model, image_size=SIZE))(state, batch)
    assert out["logits"].shape == (BATCH, 7) and int(out["confusion"].sum()) == BATCH
    assert int(np.trace(out["confusion"])) == int(out["correct"])


def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
    model, tx, state, batch = _setup(jnp.bfloat16)
    new, metrics = jax.jit(make_train_step(model, tx, image_size=SIZE))(state, batch, jax.random.key(1))
    dtypes = {x.dtype for x in jax.tree.leaves((new.params, new.opt_state, new.batch_stats))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes
    assert np.isfinite(float(metrics["loss_sum"]))
    jaxpr = jax.make_jaxpr(make_train_step(model, tx, image_size=SIZE))(state, batch, jax.random.key(1))
    assert "bf16" in str(jaxpr)  # the convolutions run in bfloat16
