"""`arm-jax evaluate` and `arm-jax calibrate`."""

import logging
import sys
from pathlib import Path

import click

from arm_jax.data.base import SPLITS
from arm_jax.data.classes import DATASET_CLASSES
from arm_jax.data.sources import DATASETS
from arm_jax.models import GAR_MODES


def log_to_stderr(verbose: bool) -> None:
    """The library's warnings (e.g. an assumed class order) on stderr; --verbose: debug too."""
    logger = logging.getLogger("arm_jax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def write_json(text: str, destination: str) -> None:
    """`-` is standard output; anything else a file."""
    if destination == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(destination).write_text(text + "\n")


def default_png_path(checkpoint: Path, dataset: str, split: str) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / f"confusion-{dataset}-{split}.png"


@click.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Training workdir, model directory (arm-jax convert), or the authors' .pth.")
@click.option("--dataset", type=click.Choice(DATASETS), default="synthetic", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder holding the data set as distributed.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--gar", type=click.Choice(GAR_MODES), default="running", show_default=True,
              help="running: batch-independent; batch: the released code's per-batch mean (shuffled batches).")
@click.option("--shuffle/--no-shuffle", default=None, help="Shuffle test batches (default: only with --gar batch).")
@click.option("--calibrate", is_flag=True, help="Estimate a missing running GAR from the training split first.")
@click.option("--calibrate-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --calibrate: the batch size the model was trained with (BatchNorm uses batch statistics).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", default=None, help="Write the results as JSON to FILE ('-' for standard output).")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Confusion-matrix image (default: beside the checkpoint).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records (reported) instead of stopping.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--class-names", default=None,
              help="For a model without class names: its classes, comma-separated, in label order.")
@click.option("--model-classes", type=click.Choice(sorted(DATASET_CLASSES)), default=None,
              help="For a model without class names: the data set whose class order it was trained in.")
@click.option("--verbose", is_flag=True, help="Debug messages, TFDS's own warnings included.")
def evaluate(checkpoint, dataset, data_dir, split, batch_size, gar, shuffle, calibrate, calibrate_batch_size, seed,
             json_out, png, skip_bad, workers, class_names, model_classes, verbose):
    """WA, UA, per-class accuracy and the confusion matrix of a model on a data set split.

    The model's classes meet the data set's by name (another data set's model works too).
    """
    from arm_jax.inference.evaluate import evaluate as run_evaluation
    from arm_jax.inference.report import confusion_png, evaluation_table

    log_to_stderr(verbose)
    report = run_evaluation(checkpoint, dataset, data_dir, split=split, batch_size=batch_size, gar=gar, seed=seed,
                            shuffle=shuffle, calibrate=calibrate, skip_bad=skip_bad, worker_count=workers,
                            progress=json_out != "-", class_names=class_names, model_classes=model_classes,
                            calibrate_batch_size=calibrate_batch_size)
    png = png or default_png_path(checkpoint, dataset, split)
    confusion_png(report.confusion, list(report.class_names), png,
                  title=f"{dataset}/{split}: WA {100 * report.wa:.2f}%, UA {100 * report.ua:.2f}% (GAR {gar})",
                  column_names=list(report.column_names))
    if json_out == "-":
        write_json(report.to_json(), "-")
        return
    click.echo(evaluation_table(report))
    click.echo(f"confusion matrix image: {png}")
    if json_out:
        write_json(report.to_json(), json_out)


@click.command("calibrate")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--dataset", type=click.Choice(DATASETS), required=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--output", required=True, type=click.Path(path_type=Path), help="New model directory to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="The batch size the model was trained with (BatchNorm uses batch statistics).")
@click.option("--max-examples", type=click.IntRange(min=1), default=None, help="Use at most this many training images.")
@click.option("--skip-bad", is_flag=True)
@click.option("--class-names", default=None,
              help="For a model without class names: its classes, comma-separated, in label order.")
@click.option("--model-classes", type=click.Choice(sorted(DATASET_CLASSES)), default=None,
              help="For a model without class names: the data set whose class order it was trained in.")
def calibrate(checkpoint, dataset, data_dir, output, batch_size, max_examples, skip_bad, class_names,
              model_classes):
    """Estimate the running GAR from training images (for checkpoints that have none)."""
    from arm_jax.inference.calibrate import calibrate_job

    log_to_stderr(verbose=False)
    calibrate_job(checkpoint, dataset, data_dir, output, batch_size=batch_size, max_examples=max_examples,
                  skip_bad=skip_bad, class_names=class_names, model_classes=model_classes)
    click.echo(f"wrote {output}: running GAR estimated from {dataset}/train")
