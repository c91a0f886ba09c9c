"""The optimiser and lr schedule of the released recipe: Adam with L2, ExponentialLR per epoch."""

from __future__ import annotations

import optax

from arm_jax.training.config import TrainConfig


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """step -> lr, constant within an epoch and multiplied by gamma at each epoch boundary.

    This is torch's ExponentialLR stepped once per epoch: epoch e trains at lr * gamma**e.
    Train loaders drop the last partial batch, so every epoch has the same number of steps
    and the optimiser's own step counter tells the epoch.
    """
    return optax.exponential_decay(
        init_value=config.lr,
        transition_steps=steps_per_epoch,
        decay_rate=config.lr_gamma,
        staircase=True,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas, eps, weight_decay) under the per-epoch schedule.

    PyTorch's Adam adds weight_decay * param to the GRADIENT before the moments (L2, not
    AdamW's decoupled decay), for every parameter, the ARM's alpha included: so the decay
    comes first in the chain and has no mask.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
    )


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """The lr used throughout `epoch` (0-based), for the logs."""
    return config.lr * config.lr_gamma**epoch
