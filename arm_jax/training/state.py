"""TrainState: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Parameters, BatchNorm statistics, the running GAR, Adam's state and the step count.

    The model and the optimiser are not part of it (they live in the step closures), so a
    state is plain data: it is checkpointed, replicated and compared leaf by leaf.
    """

    step: jax.Array  # int32 scalar: optimiser steps taken (drives the lr schedule and the RNG)
    params: Any
    batch_stats: Any
    gar: Any
    opt_state: optax.OptState

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation) -> TrainState:
        """A state at step 0 from model variables {'params', 'batch_stats', 'gar'}."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            gar=variables.get("gar", {}),
            opt_state=tx.init(variables["params"]),
        )

    @property
    def variables(self) -> dict:
        """The model variables, as `model.apply` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats, "gar": self.gar}
