"""The pure steps: training lowers the loss on a fixed batch; bf16 keeps float32 state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.slow  # fast tier: the training step compiled and run at 96 px (69 s under load)
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model, tx, state, batch = _setup(jnp.float32)
    step = jax.jit(make_train_step(model, tx, image_size=SIZE))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(1))
        assert int(metrics["count"]) == BATCH
        losses.append(float(metrics["loss_sum"]) / BATCH)
    assert int(state.step) == 4
    print(f"mean loss over 4 steps on one batch: {losses}")
    assert losses[-1] < 0.5 * losses[0], losses
    # Evaluation: the confusion matrix has a row per TRUE class. Labels shifted by one make
    # most predictions wrong, so a transposed matrix (rows = predicted) cannot pass.
    shifted = {**batch, "label": (batch["label"] + 1) % 7}
    out = jax.jit(make_eval_step(model, image_size=SIZE))(state, shifted)
    assert out["logits"].shape == (BATCH, 7)
    expected = np.zeros((7, 7), np.int64)
    for label, predicted in zip(shifted["label"], np.asarray(out["logits"]).argmax(-1), strict=True):
        expected[label, predicted] += 1
    assert not np.array_equal(expected, expected.T)
    np.testing.assert_array_equal(out["confusion"], expected)
    assert int(np.trace(out["confusion"])) == int(out["correct"])


def _conv_operand_dtypes(jaxpr) -> list[set]:
    """The operand dtypes of every convolution in a jaxpr, nested jaxprs (jit, vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append({str(v.aval.dtype) for v in eqn.invars})
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _conv_operand_dtypes(inner)
    return found


@pytest.mark.slow  # fast tier: the bf16 training step compiled and traced at 96 px (82 s under load)
def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
    model, tx, state, batch = _setup(jnp.bfloat16)
    new, metrics = jax.jit(make_train_step(model, tx, image_size=SIZE))(state, batch, jax.random.key(1))
    # Parameters, Adam moments, BatchNorm statistics and the running GAR all stay float32.
    dtypes = {x.dtype for x in jax.tree.leaves((new.params, new.opt_state, new.batch_stats, new.gar))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes
    assert new.gar["arm"]["affinity"]["mean"].dtype == jnp.float32
    assert np.isfinite(float(metrics["loss_sum"]))
    jaxpr = jax.make_jaxpr(make_train_step(model, tx, image_size=SIZE))(state, batch, jax.random.key(1))
    convs = _conv_operand_dtypes(jaxpr.jaxpr)
    # 20 backbone convolutions and De-albino forward, and their backward passes: all in bf16.
    assert len(convs) >= 21 and all(operands == {"bfloat16"} for operands in convs), convs
