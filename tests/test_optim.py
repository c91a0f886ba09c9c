"""The optimiser equals torch.optim.Adam(weight_decay) + ExponentialLR stepped per epoch."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arm_jax.training.config import TrainConfig
from arm_jax.training.optim import learning_rate_schedule, lr_at_epoch, make_optimizer

torch = pytest.importorskip("torch")


def _loss_grad(w, x, y):
    """Gradient of sum((x @ w - y)**2) by hand, the same function torch differentiates."""
    return 2.0 * x.T @ (x @ w - y)


@pytest.mark.parametrize("sampler,gamma", [("shuffle", 0.9), ("mrr", 0.78)])
def test_matches_torch_adam_with_l2_and_exponential_lr(sampler, gamma):
    steps_per_epoch, epochs = 3, 2
    config = TrainConfig(sampler=sampler, lr=1e-2, weight_decay=1e-1)  # large decay: visible
    assert config.lr_gamma == gamma
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5,)).astype(np.float64)
    batches = [(rng.normal(size=(4, 5)), rng.normal(size=(4,))) for _ in range(6)]

    # torch reference.
    wt = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.Adam([wt], lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    torch_path = []
    for epoch in range(epochs):
        for s in range(steps_per_epoch):
            x, y = batches[epoch * steps_per_epoch + s]
            opt.zero_grad()
            loss = ((torch.tensor(x) @ wt - torch.tensor(y)) ** 2).sum()
            loss.backward()
            opt.step()
            torch_path.append(wt.detach().numpy().copy())
        sched.step()

    # optax.
    tx = make_optimizer(config, steps_per_epoch)
    w = jnp.asarray(w0, dtype=jnp.float32)
    state = tx.init(w)
    for i, (x, y) in enumerate(batches):
        g = _loss_grad(w, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(np.asarray(w), torch_path[i], rtol=1e-5, atol=1e-6)


def test_schedule_is_constant_within_an_epoch():
    config = TrainConfig(lr=1.0, gamma=0.5)
    schedule = learning_rate_schedule(config, steps_per_epoch=4)
    assert [float(schedule(s)) for s in range(9)] == [1.0] * 4 + [0.5] * 4 + [0.25]
    assert lr_at_epoch(config, 2) == 0.25
