"""`arm-jax train` end to end against the PyTorch model's training step, bracketed.

    python scripts/benchmark_e2e.py [--image-size 112] [--batch-size 32] [--workers 2]
                                    [--epochs 2] [--rounds 1] [--torch-steps 8]

Each round measures PyTorch's training images/s (the reference model of the parity tests,
NCHW and channels_last, as many threads as cores, the median of `--torch-steps` steps after
one warm-up), then runs the user's command
    arm-jax train --dataset synthetic --image-size S --batch-size B --workers W --epochs E
in a fresh workdir and reads its last epoch's images/s from metrics.jsonl (training steps
only: from the first batch to the last step's metrics, worker start-up and compilation fall
in epoch 1), then measures PyTorch again. The ratio is against the mean of the two PyTorch
measurements that bracket the run: this machine's speed drifts by 10-20% over minutes
(measured: PyTorch 24.4 images/s before a 4-minute run, 28.7 after), more than the
differences compared here. Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # benchmark_model (which adds tests/, the PyTorch model)

import results_table  # noqa: E402  (scripts/)


def torch_images_per_s(variant: str, args) -> float:
    """Median training images/s of the PyTorch ARM-ResNet-18 ('float32' NCHW or 'float32-cl'):
    benchmark_model.py's PyTorch step, timed alone (its arm-jax step would share the cores)."""
    from benchmark_model import torch_runner  # scripts/, beside this file

    step = torch_runner("train", args.batch_size, args.image_size, variant, "cpu")
    step()  # warm-up
    seconds = []
    for _ in range(args.torch_steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return args.batch_size / statistics.median(seconds)


def arm_jax_images_per_s(args) -> tuple[float, list[dict]]:
    """The last epoch's images/s of the CLI run (and every epoch's record)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = ["arm-jax", "train", "--dataset", "synthetic", "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--epochs", str(args.epochs), "--workdir", workdir, "--quiet"]
        print("  $", " ".join(command[:-3]), flush=True)
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["images_per_s"], records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--torch-steps", type=int, default=8)
    results_table.add_option(parser)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    variants = ("float32", "float32-cl")
    print(f"synthetic, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
          f"epoch {args.epochs} of {args.epochs}; torch {torch.__version__}, {os.cpu_count()} threads; "
          f"1-min load {os.getloadavg()[0]:.2f}")
    ratios = {v: [] for v in variants}
    ours_per_round, nchw_per_round = [], []
    for round_ in range(1, args.rounds + 1):
        before = {v: torch_images_per_s(v, args) for v in variants}
        ours, records = arm_jax_images_per_s(args)
        after = {v: torch_images_per_s(v, args) for v in variants}
        epochs = ", ".join(f"{r['images_per_s']:.1f}" for r in records)
        print(f"round {round_}: arm-jax train epoch {args.epochs}: {ours:.1f} images/s (epochs: {epochs})")
        ours_per_round.append(f"{ours:.1f}")
        nchw_per_round.append(f"{before['float32']:.1f} / {after['float32']:.1f}")
        for v in variants:
            bracket = (before[v] + after[v]) / 2
            ratios[v].append(ours / bracket)
            print(f"  PyTorch {v:<10} {before[v]:5.1f} before, {after[v]:5.1f} after: "
                  f"ratio {ours / bracket:.2f} to their mean")
    for v in variants:
        print(f"ratio arm-jax end to end / PyTorch {v} step: median {statistics.median(ratios[v]):.2f} "
              f"over {args.rounds} round(s)")
    print(f"1-min load {os.getloadavg()[0]:.2f} at the end")
    if args.markdown:
        def per_round(values):
            return ", ".join(f"{v:.2f}" for v in values) + f" (median {statistics.median(values):.2f})"

        row = {**results_table.stamp(),
               "run": f"synthetic, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
                      f"epoch {args.epochs} of {args.epochs}",
               "arm-jax images/s per round": ", ".join(ours_per_round),
               "PyTorch NCHW images/s before / after": ", ".join(nchw_per_round),
               "arm-jax / NCHW": per_round(ratios["float32"]),
               "arm-jax / channels_last": per_round(ratios["float32-cl"])}
        results_table.write_rows(args.markdown, "benchmark_e2e", [row])


if __name__ == "__main__":
    main()
