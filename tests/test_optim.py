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


# Leaves named as in the model, of the sizes that matter: weight decay must reach every one,
# alpha included (the released code's Adam decays all parameters).
LEAVES = {("backbone", "conv1", "kernel"): 5, ("arm", "affinity", "alpha"): 1, ("fc", "bias"): 3}


def _nest(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@pytest.mark.parametrize("sampler,gamma", [("shuffle", 0.9), ("mrr", 0.78)])
def test_matches_torch_adam_with_l2_and_exponential_lr(sampler, gamma):
    steps_per_epoch, epochs = 3, 2
    config = TrainConfig(sampler=sampler, lr=1e-2, weight_decay=1e-1)  # large decay: visible
    assert config.lr_gamma == gamma
    rng = np.random.default_rng(0)
    w0 = {path: rng.normal(size=(n,)) for path, n in LEAVES.items()}
    batches = [{path: (rng.normal(size=(4, n)), rng.normal(size=(4,))) for path, n in LEAVES.items()}
               for _ in range(steps_per_epoch * epochs)]

    # torch reference: one Adam over all the leaves.
    wt = {path: torch.tensor(w, requires_grad=True) for path, w in w0.items()}
    opt = torch.optim.Adam(list(wt.values()), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    torch_path = []
    for epoch in range(epochs):
        for s in range(steps_per_epoch):
            batch = batches[epoch * steps_per_epoch + s]
            opt.zero_grad()
            loss = sum(((torch.tensor(x) @ wt[path] - torch.tensor(y)) ** 2).sum() for path, (x, y) in batch.items())
            loss.backward()
            opt.step()
            torch_path.append({path: w.detach().numpy().copy() for path, w in wt.items()})
        sched.step()

    # optax, on the same leaves nested as model parameters, in float32 against torch's float64: the
    # gap is float32 rounding, which Adam does not amplify here. Every gradient element of these
    # draws is at least 0.69% of the sum of its terms' magnitudes (computed in float64 along the
    # trajectory), so no rounding (~1e-7 of that sum) flips its sign, and a gradient error of even
    # 1e-6 of it moves an Adam update by at most 5.4e-7: within the tolerance on any CPU.
    tx = make_optimizer(config, steps_per_epoch)
    w = _nest({path: jnp.asarray(v, dtype=jnp.float32) for path, v in w0.items()})
    state = tx.init(w)
    for i, batch in enumerate(batches):
        g = _nest({path: _loss_grad(_leaf(w, path), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
                   for path, (x, y) in batch.items()})
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
        for path in LEAVES:
            np.testing.assert_allclose(np.asarray(_leaf(w, path)), torch_path[i][path], rtol=1e-5, atol=1e-6,
                                       err_msg="/".join(path))


def _leaf(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def test_schedule_is_constant_within_an_epoch():
    config = TrainConfig(lr=1.0, gamma=0.5)
    schedule = learning_rate_schedule(config, steps_per_epoch=4)
    assert [float(schedule(s)) for s in range(9)] == [1.0] * 4 + [0.5] * 4 + [0.25]
    assert lr_at_epoch(config, 2) == 0.25
