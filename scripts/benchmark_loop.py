"""How long the real training loop would keep a device waiting on the host.

    python scripts/benchmark_loop.py [--image-size 48] [--batch-size 32] [--workers 2]
                                     [--epochs 3] [--train-examples 640] [--eval-examples 320]

Runs `arm_jax.training.loop.train` on the synthetic faces (ARM-ResNet-18, by default at
48 px so that the host's share shows) with validation and an epoch-end checkpoint every
epoch, and reads the loop's timing record (`arm_jax.training.feed.Timings`):
  per epoch: wall time of the training steps, time blocked waiting for the next batch and
    its share of the two (the device's idle share while the loop waits for data; the
    first batch, worker start-up included, is shown apart), validation and its batch waits;
  per epoch boundary: from the end of epoch e's last step (its metrics are back) to the
    start of epoch e+1's first step, validation excluded (checkpoint, log, first batch).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import results_table  # noqa: E402  (scripts/, beside this file)


def measure(args) -> dict:
    import arm_jax

    arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
    from arm_jax.training import loop
    from arm_jax.training.config import TrainConfig
    from arm_jax.training.feed import Timings

    timings = Timings()
    with tempfile.TemporaryDirectory() as workdir:
        config = TrainConfig(dataset="synthetic", image_size=args.image_size, batch_size=args.batch_size,
                             eval_batch_size=args.batch_size, epochs=args.epochs, worker_count=args.workers,
                             max_train_examples=args.train_examples, max_eval_examples=args.eval_examples,
                             parallel="none", checkpoint_every_steps=0, quiet=True, workdir=workdir)
        started = time.perf_counter()
        summary = loop.train(config, timings=timings)
        wall = time.perf_counter() - started
    if summary["status"] != "done":
        sys.exit(f"benchmark_loop: training ended {summary['status']}")
    return {"config": {k: getattr(config, k) for k in ("image_size", "batch_size", "worker_count", "epochs",
                                                       "max_train_examples", "max_eval_examples")},
            "wall_s": wall, **summarize(timings.events, args.epochs)}


def summarize(events, epochs: int) -> dict:
    by = defaultdict(list)
    for what, epoch, start, end in events:
        by[what, epoch].append((start, end))
    seconds = lambda spans: sum(end - start for start, end in spans)
    per_epoch, boundaries = [], []
    for e in range(epochs):
        waits, steps = by["batch", e], by["step", e]
        later = waits[1:]
        per_epoch.append({
            "epoch": e + 1, "steps": len(waits),
            "first_batch_wait_s": waits[0][1] - waits[0][0],
            "train_s": seconds(waits) + seconds(steps),
            "batch_wait_s": seconds(later),
            "wait_share": seconds(later) / (seconds(later) + seconds(steps[1:])),  # first batch & step apart
            "validation_s": seconds(by["validate", e]),
            "val_batch_wait_s": seconds(by["val_batch", e]),
        })
        if e + 1 < epochs:
            last_step_end = steps[-1][1]
            next_step_start = by["step", e + 1][0][0]
            total = next_step_start - last_step_end
            validation = seconds(by["validate", e])
            boundaries.append({
                "from_epoch": e + 1, "total_s": total, "validation_s": validation,
                "overhead_s": total - validation,  # the target: < 0.2 s with 2 workers
                "epoch_end_s": seconds(by["epoch_end", e]),  # checkpoint dispatch, metrics, log
                "first_batch_wait_s": by["batch", e + 1][0][1] - by["batch", e + 1][0][0],
            })
    return {"epochs": per_epoch, "boundaries": boundaries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=640)
    parser.add_argument("--eval-examples", type=int, default=320)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    results_table.add_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load = os.getloadavg()[0]
    result = measure(args)
    result["load_1min"] = [load, os.getloadavg()[0]]
    print(f"config {json.dumps(result['config'])}; wall {result['wall_s']:.1f} s; 1-min load "
          f"{load:.2f} before, {result['load_1min'][1]:.2f} after ({os.cpu_count()} cores)")
    print("epoch  steps  train s  1st batch s  batch wait s  wait share  validation s  val batch wait s")
    for r in result["epochs"]:
        print(f"{r['epoch']:>5}  {r['steps']:>5}  {r['train_s']:>7.2f}  {r['first_batch_wait_s']:>11.3f}  "
              f"{r['batch_wait_s']:>12.3f}  {r['wait_share']:>10.1%}  {r['validation_s']:>12.2f}  "
              f"{r['val_batch_wait_s']:>16.3f}")
    print("boundary  total s  validation s  overhead s (target < 0.2)  of which: epoch end s, 1st batch s")
    for b in result["boundaries"]:
        print(f"  {b['from_epoch']} -> {b['from_epoch'] + 1}  {b['total_s']:>7.3f}  {b['validation_s']:>12.3f}  "
              f"{b['overhead_s']:>25.3f}  {b['epoch_end_s']:>20.3f}, {b['first_batch_wait_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        row = {**results_table.stamp(),
               "run": f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers, {args.epochs} epochs, "
                      f"{args.train_examples} / {args.eval_examples} examples",
               "batch wait share per epoch": ", ".join(f"{r['wait_share']:.1%}" for r in result["epochs"]),
               "epoch boundaries s (without validation)": ", ".join(
                   f"{b['from_epoch']} -> {b['from_epoch'] + 1}: {b['overhead_s']:.3f}" for b in result["boundaries"]),
               "wall s": f"{result['wall_s']:.1f}"}
        results_table.write_rows(args.markdown, "benchmark_loop", [row])


if __name__ == "__main__":
    main()
