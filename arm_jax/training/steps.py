"""Pure training and evaluation steps: (state, batch, rng) -> (state, metrics)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from arm_jax.data.transforms import augmentation_keys
from arm_jax.forward import apply_to_images
from arm_jax.training.state import TrainState

TrainStep = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
EvalStep = Callable[[TrainState, dict], dict]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in float32 (nn.CrossEntropyLoss before its mean)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _sum_metrics(losses, logits, labels, axis_name):
    metrics = {
        "loss_sum": losses.sum(),
        "correct": (logits.argmax(-1) == labels).sum().astype(jnp.int32),
        "count": jnp.asarray(labels.shape[0], jnp.int32),
    }
    return jax.lax.psum(metrics, axis_name) if axis_name else metrics


def make_train_step(model, tx: optax.GradientTransformation, *, augment: bool = True) -> TrainStep:
    """The training step of `model` (built with axis_name for pmap, None otherwise).

    Returns train_step(state, batch, rng) -> (new_state, metrics) with metrics the GLOBAL
    sums loss_sum, correct, count. `rng` is the run's step key. With `augment` (training; off
    for checks of the step's arithmetic) each image gets the released train transform on the
    device, drawn from the record's place in its epoch: the batch holds 'epoch' and 'position'
    (data.pipeline.batch_positions) beside 'image' and 'label'. Dropout folds in the step
    number. Either way a resumed run draws what an uninterrupted one would.
    """
    axis_name = model.axis_name

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        step_rng, augment_rng = jax.random.split(rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        dropout_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name)) if axis_name else step_rng
        keys = augmentation_keys(augment_rng, batch["epoch"], batch["position"]) if augment else None
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats, "gar": state.gar}
            logits, updates = apply_to_images(model, variables, batch["image"], augment_keys=keys, train=True,
                                              mutable=["batch_stats", "gar"], rngs={"dropout": dropout_rng})
            losses = cross_entropy(logits, labels)
            return losses.mean(), (losses, logits, updates)

        grads, (losses, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
        if axis_name:
            # Each device's gradient is already that of the global loss sum through the
            # cross-device BN/GAR means; the mean over devices is the global-batch gradient.
            grads = jax.lax.pmean(grads, axis_name)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, param_updates),
            batch_stats=updates.get("batch_stats", state.batch_stats),
            gar=updates.get("gar", state.gar),
            opt_state=opt_state,
        )
        return new_state, _sum_metrics(losses, logits, labels, axis_name)

    return train_step


def make_eval_step(model) -> EvalStep:
    """eval_step(state, batch) -> {'logits', 'confusion', 'loss_sum', 'correct', 'count'}.

    Nothing is mutable. With gar_mode 'batch' the GAR is the mean over this batch (all
    devices' shares of it), as in the released test script. 'confusion' is the
    (C, C) count matrix (row = label) summed over devices, so hosts need not gather logits.
    """
    axis_name = model.axis_name

    def eval_step(state: TrainState, batch: dict) -> dict:
        labels = batch["label"]
        logits = apply_to_images(model, state.variables, batch["image"])
        num_classes = logits.shape[-1]
        confusion = jnp.einsum("nc,nd->cd", jax.nn.one_hot(labels, num_classes, dtype=jnp.int32),
                               jax.nn.one_hot(logits.argmax(-1), num_classes, dtype=jnp.int32))
        metrics = _sum_metrics(cross_entropy(logits, labels), logits, labels, None)
        metrics["confusion"] = confusion
        if axis_name:
            metrics = jax.lax.psum(metrics, axis_name)
        return {**metrics, "logits": logits}

    return eval_step
