"""The model code of a git revision (A) against the working tree's (B) on this machine, interleaved in one process.

    python scripts/benchmark_ab.py --base main                 # 112 px, batch 32: training step and forward
    python scripts/benchmark_ab.py --base HEAD~1 --image-size 64 112 --rounds 15

A is `arm_jax/models/` as committed at --base, imported as a separate package; everything
else (the training step, the optimizer, the compiler options) is the working tree's, so
only the model code differs. Each step is compiled as `arm-jax train` compiles it (one
device, xla_flags.training_compiler_options), warmed up, then A and B run in turns
(A, B, A, B, ...) so that a change in machine load hits both alike; the ratio B/A is the
median time of A over the median time of B (above 1: B is faster). A and B start from the
same state and batch, and the script says whether their results are bitwise equal and
whether XLA compiled them into the same instructions (names and metadata aside): if so, any
difference in time is the machine's noise.
"""

import argparse
import importlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # arm_jax from a checkout

import arm_jax  # noqa: E402

arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
import jax  # noqa: E402
import numpy as np  # noqa: E402

from arm_jax.interop.pretrained import init_variables  # noqa: E402
from arm_jax.models import ARMResNet18  # noqa: E402
from arm_jax.models.resnet import largest_activation_bytes  # noqa: E402
from arm_jax.training.config import TrainConfig  # noqa: E402
from arm_jax.training.optim import make_optimizer  # noqa: E402
from arm_jax.training.state import TrainState  # noqa: E402
from arm_jax.training.steps import make_train_step  # noqa: E402
from arm_jax.xla_flags import training_compiler_options  # noqa: E402

NUM_CLASSES = 7


def models_at(revision: str, folder: Path):
    """The ARMResNet18 class of `arm_jax/models/` at `revision`, as package `models_at_revision`."""
    package = folder / "models_at_revision"
    package.mkdir()
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:arm_jax/models"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for name in listing:
        if name.endswith(".py"):
            source = subprocess.run(["git", "show", f"{revision}:arm_jax/models/{name}"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout
            (package / name).write_text(source.replace("arm_jax.models", "models_at_revision"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("models_at_revision").ARMResNet18


def runners(model_class, size: int, batch: int):
    """{mode: (run, result, compiled)}: run() does one forward pass or training step, result() returns
    its last output, compiled() the optimized HLO text of its program."""
    model = model_class(num_classes=NUM_CLASSES, image_size=size)
    variables = init_variables(ARMResNet18(num_classes=NUM_CLASSES, image_size=size), jax.random.key(0))
    tx = make_optimizer(TrainConfig(), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    train_batch = {"image": images, "label": np.arange(batch, dtype=np.int32) % NUM_CLASSES}
    options = training_compiler_options(largest_activation_bytes(batch, size))
    # Without the augmentation: only the model code differs between A and B.
    train_step = jax.jit(make_train_step(model, tx, augment=False), compiler_options=options)
    start = TrainState.create(variables, tx)
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    last = {}

    def train():
        last["train"] = train_step(start, train_batch, jax.random.key(2))
        jax.block_until_ready(last["train"])

    def infer():
        last["forward"] = forward(variables, x).block_until_ready()

    return {"train": (train, lambda: last["train"],
                      lambda: train_step.lower(start, train_batch, jax.random.key(2)).compile().as_text()),
            "forward": (infer, lambda: last["forward"], lambda: forward.lower(variables, x).compile().as_text())}


def instructions(hlo_text: str) -> list[str]:
    """The optimized HLO's instruction lines in order, with names and metadata (source locations) removed."""
    body = re.sub(r", metadata=\{[^}]*\}", "", hlo_text)
    body = re.sub(r"%[\w.\-]+", "%", body)
    return [line.strip() for line in body.splitlines() if " = " in line]


def interleaved_seconds(contenders: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each contender over `rounds` turns, after `warmup` calls each."""
    for run in contenders.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    return times


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision of A's arm_jax/models (B: the working tree)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[112])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=("train", "forward"), default=["train", "forward"])
    parser.add_argument("--rounds", type=int, default=9, help="timed turns per contender (median)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}); "
          f"A = arm_jax/models at {args.base}, B = working tree; batch {args.batch}")
    with tempfile.TemporaryDirectory() as folder:
        model_a = models_at(args.base, Path(folder))
        for size in args.image_size:
            a, b = runners(model_a, size, args.batch), runners(ARMResNet18, size, args.batch)
            for mode in args.modes:
                load_before = os.getloadavg()[0]
                times = interleaved_seconds({"A": a[mode][0], "B": b[mode][0]}, args.rounds, args.warmup)
                load_after = os.getloadavg()[0]
                median = {name: float(np.median(t)) for name, t in times.items()}
                same = all(np.array_equal(x, y) for x, y in
                           zip(jax.tree.leaves(a[mode][1]()), jax.tree.leaves(b[mode][1]()), strict=True))
                compiled_alike = instructions(a[mode][2]()) == instructions(b[mode][2]())
                print(f"{mode:7s} {size:3d} px: A {median['A'] * 1e3:7.1f} ms, B {median['B'] * 1e3:7.1f} ms, "
                      f"B/A speed {median['A'] / median['B']:.3f} (median of {args.rounds} interleaved rounds; "
                      f"load average {load_before:.1f} -> {load_after:.1f}); outputs bitwise equal: {same}; "
                      f"same compiled instructions: {compiled_alike}")


if __name__ == "__main__":
    main()
