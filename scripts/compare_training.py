"""Whole training runs of arm-jax and of the released recipe in PyTorch, on the same data splits.

    python scripts/compare_training.py --dataset fer2013 --data-dir data/digits --seeds 0 1 2 --epochs 4 \
        --image-size 112 --batch-size 32 --out runs/compare [--markdown]

For each seed, trains the released code's model with the released recipe in PyTorch
(arm_jax/interop/torch_recipe.py: Adam with L2 on every parameter, ExponentialLR stepped per
epoch, flip-or-noise and RandomErasing) and `arm-jax train` with its defaults (the same data
set, splits, epochs, batch, image size, backbone and seed), then writes OUT/comparison.json
(per seed and epoch: train loss, train accuracy, validation accuracy of both; mean and spread
over seeds; the verdict) and OUT/comparison.png (each metric's two curves with min-max bands),
and prints the verdict line: "together", or "apart" naming the epochs and metrics that differ
(arm_jax/reproduce/curves.py states the rule). Runs already finished in OUT are reused.
--markdown also writes the per-epoch means and the verdict as this machine's row of the
`compare_training` table in scripts/README.md (scripts/results_table.py).

--break-lr-schedule-per-batch exists only to show that the verdict can fail: it steps
arm-jax's learning-rate decay after every batch instead of every epoch, a plausible bug that
one-step parity tests cannot see, and the verdict must then say "apart".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_table  # noqa: E402  (scripts/, beside this file)

FRAMEWORKS = ("arm-jax", "PyTorch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="an arm-jax data set name (fer2013, raf_db, ...)")
    parser.add_argument("--data-dir", default=None, help="the data set's folder as distributed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrained", default="none", help="none, or a torchvision resnet18 .pth for both")
    parser.add_argument("--workers", type=int, default=0, help="arm-jax's grain worker processes")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's intra-op threads (default: its own); 1 on a CPU other jobs share")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--break-lr-schedule-per-batch", action="store_true",
                        help="FOR CHECKING THIS SCRIPT ONLY: a deliberately wrong arm-jax (lr decay every batch)")
    results_table.add_option(parser)
    args = parser.parse_args(argv)
    if args.markdown and args.break_lr_schedule_per_batch:
        parser.error("--markdown records comparisons of arm-jax as it is, not with --break-lr-schedule-per-batch")
    return args


@contextlib.contextmanager
def lr_stepped_per_batch():
    """The deliberate bug: arm-jax's ExponentialLR decays after every batch instead of every epoch."""
    import optax

    from arm_jax.training import optim

    def per_batch(config, steps_per_epoch):
        return optax.exponential_decay(config.lr, transition_steps=1, decay_rate=config.lr_gamma, staircase=True)

    with mock.patch.object(optim, "learning_rate_schedule", per_batch):  # fails loudly if the name goes
        yield


def run_arm_jax(args, seed: int) -> list[dict]:
    """arm-jax train with its defaults on the same data; its metrics.jsonl records (a finished run is reused)."""
    from arm_jax.reproduce.runner import metrics_records
    from arm_jax.training.config import TrainConfig
    from arm_jax.training.loop import train

    folder = "arm-jax-lr-per-batch" if args.break_lr_schedule_per_batch else "arm-jax"
    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, workdir=str(args.out / folder / f"seed{seed}"),
                         seed=seed, epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                         pretrained=args.pretrained, worker_count=args.workers, quiet=True)
    with lr_stepped_per_batch() if args.break_lr_schedule_per_batch else contextlib.nullcontext():
        summary = train(config)
    if summary["status"] != "done":
        sys.exit(f"compare_training: arm-jax training ended {summary['status']}")
    return metrics_records(Path(config.workdir))[:args.epochs]


def run_pytorch(args, seed: int, data) -> list[dict]:
    """The released recipe in PyTorch; cached in OUT/pytorch/seedN.json while its settings match."""
    from arm_jax.interop import torch_recipe

    recipe = torch_recipe.Recipe(image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs, seed=seed)
    settings = {"recipe": dataclasses.asdict(recipe), "backbone_init": "torchvision",
                "dataset": args.dataset, "data_dir": args.data_dir, "pretrained": args.pretrained}
    cache = args.out / "pytorch" / f"seed{seed}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["settings"] == settings and len(saved["records"]) == args.epochs:
            return saved["records"]
    backbone = None
    if args.pretrained.lower() != "none":
        backbone = torch_recipe.torch.load(args.pretrained, map_location="cpu", weights_only=True)
    (train_images, train_labels), (val_images, val_labels), classes = data
    records = torch_recipe.train_released_recipe(
        train_images, train_labels, val_images, val_labels, len(classes), recipe, backbone=backbone,
        on_epoch=lambda r: print(f"  PyTorch seed {seed} epoch {r['epoch']}: loss {r['train_loss']:.4f} "
                                 f"acc {r['train_acc']:.4f} val {r['val_wa']:.4f} ({r['images_per_s']:.1f} img/s)",
                                 flush=True))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"settings": settings, "records": records}, indent=2) + "\n")
    return records


def read_splits(args):
    """The train and validation splits arm-jax trains and validates on, as uint8 images and labels."""
    import numpy as np

    from arm_jax.data.sources import decode_size_hint
    from arm_jax.data.splits import open_split
    from arm_jax.training.config import TrainConfig

    arrays = []
    for split in ("train", TrainConfig().eval_split):
        data = open_split(args.dataset, args.data_dir, split,
                          image_size_hint=decode_size_hint(args.dataset, args.image_size))
        arrays.append(([data[i]["image"] for i in range(len(data))], np.asarray(data.labels)))
    return arrays[0], arrays[1], tuple(data.class_names)


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def table(summary: dict) -> str:
    lines = ["epoch | metric      | arm-jax mean (min..max)     | PyTorch mean (min..max)"]
    for metric in ("train_loss", "train_acc", "val_wa"):
        for a, b in zip(summary["arm-jax"][metric], summary["PyTorch"][metric]):
            lines.append(f"{a['epoch']:5d} | {metric:11s} | {a['mean']:.4f} ({a['min']:.4f}..{a['max']:.4f}) | "
                         f"{b['mean']:.4f} ({b['min']:.4f}..{b['max']:.4f})")
    return "\n".join(lines)


def markdown_row(record: dict) -> dict[str, str]:
    """This run as a row of scripts/README.md's compare_training table: per-epoch means, both frameworks."""
    settings, summary = record["settings"], record["summary"]

    def means(framework, metric):
        return " / ".join(f"{point['mean']:.3f}" for point in summary[framework][metric])

    seeds = " ".join(map(str, settings["seeds"]))
    run = (f"{settings['dataset']}: {record['train_images']} train / {record['val_images']} val images, "
           f"{settings['epochs']} epochs, {settings['image_size']} px, batch {settings['batch_size']}, "
           f"pretrained {settings['pretrained']}, seeds {seeds}")
    device = record["machine"]["device"]
    machine = None if device.lower() == "cpu" else f"{device} (host: {results_table.cpu()})"
    return {**results_table.stamp(machine), "run": run,
            "train loss per epoch, arm-jax": means("arm-jax", "train_loss"),
            "train loss, PyTorch": means("PyTorch", "train_loss"),
            "validation accuracy per epoch, arm-jax": means("arm-jax", "val_wa"),
            "validation accuracy, PyTorch": means("PyTorch", "val_wa"),
            "verdict": record["verdict"]["status"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import arm_jax

    arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
    from arm_jax.reproduce import curves

    try:
        import arm_jax.interop.torch_recipe  # noqa: F401
    except ModuleNotFoundError as err:
        sys.exit(f"compare_training: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    data = read_splits(args)
    runs = {name: [] for name in FRAMEWORKS}
    for seed in args.seeds:
        print(f"seed {seed}: PyTorch (released recipe)", flush=True)
        runs["PyTorch"].append(run_pytorch(args, seed, data))
        print(f"seed {seed}: arm-jax", flush=True)
        runs["arm-jax"].append(run_arm_jax(args, seed))
    summary = curves.summarise(runs)
    trained_per_epoch = len(data[0][1]) // args.batch_size * args.batch_size  # the last partial batch is dropped
    result = curves.verdict(summary, *FRAMEWORKS, counts={"train_acc": trained_per_epoch, "val_wa": len(data[1][1])})
    title = f"{args.dataset}, {len(args.seeds)} seeds"
    if args.break_lr_schedule_per_batch:
        title += ", arm-jax DELIBERATELY BROKEN (lr per batch)"
    curves.curves_figure(summary, args.out / "comparison.png", title)
    import jax
    import torch

    record = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "train_images": len(data[0][1]), "val_images": len(data[1][1]), "classes": list(data[2]),
              "machine": {"cpu": cpu_model(), "jax": jax.__version__, "torch": torch.__version__,
                          "device": str(jax.devices()[0].device_kind)},
              "runs": runs, "summary": summary, "verdict": result}
    (args.out / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(summary))
    print(f"wrote {args.out / 'comparison.json'} and {args.out / 'comparison.png'}")
    print(f"verdict: {result['line']}")
    if args.markdown:
        results_table.write_rows(args.markdown, "compare_training", [markdown_row(record)])
    return record


if __name__ == "__main__":
    main()
