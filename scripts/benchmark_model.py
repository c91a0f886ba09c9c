"""Images/s of ARM-ResNet-18 in arm-jax and in the PyTorch reference model, in one run.

    python scripts/benchmark_model.py [--batch 32] [--image-size 224] [--mode forward|train] [--steps 5]

Run from the repository root (the PyTorch model is the one the parity tests
build, tests/torch_reference.py). Both use float32 on whatever CPU/GPU JAX and
PyTorch see; the ratio printed last is arm-jax / PyTorch.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from arm_jax.interop.pretrained import init_variables
from arm_jax.models import ARMResNet18
from tests.torch_reference import TorchARMResNet18


def median_rate(run, batch: int, steps: int) -> float:
    """Images/s: the median over `steps` timed calls after two warm-ups."""
    run()
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def jax_runner(mode: str, batch: int, size: int):
    model = ARMResNet18(num_classes=7, image_size=size)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    labels = jnp.arange(batch) % 7
    if mode == "forward":
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return lambda: forward(variables, x).block_until_ready()
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
    state = {"variables": variables, "opt": optimizer.init(variables["params"])}

    @jax.jit
    def step(variables, opt_state, x):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats", "gar"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state, variables["params"])
        return {**updates, "params": optax.apply_updates(variables["params"], changes)}, opt_state

    def run():
        state["variables"], state["opt"] = step(state["variables"], state["opt"], x)
        jax.block_until_ready(state["variables"])

    return run


def torch_runner(mode: str, batch: int, size: int):
    torch.manual_seed(0)
    model = TorchARMResNet18(num_classes=7, image_size=size)
    x = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % 7
    if mode == "forward":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)

        return run
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def run():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{args.mode} pass, batch {args.batch}, {args.image_size}x{args.image_size}, float32; "
          f"JAX on {jax.devices()[0].device_kind} ({jax.default_backend()}), PyTorch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; {os.cpu_count()} CPU cores")
    jax_rate = median_rate(jax_runner(args.mode, args.batch, args.image_size), args.batch, args.steps)
    torch_rate = median_rate(torch_runner(args.mode, args.batch, args.image_size), args.batch, args.steps)
    print(f"arm-jax : {jax_rate:8.1f} images/s")
    print(f"PyTorch : {torch_rate:8.1f} images/s")
    print(f"ratio   : {jax_rate / torch_rate:8.2f} (arm-jax / PyTorch)")


if __name__ == "__main__":
    main()
