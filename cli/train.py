"""`arm-jax train`: parse options into a TrainConfig and call arm_jax.training.loop.train."""

from __future__ import annotations

import json
import logging
import sys

import click

from arm_jax.training.config import CHOICES, TrainConfig, from_overrides, worker_count_option
from arm_jax.errors import UserError

_DEFAULTS = TrainConfig()


def _default(name: str):
    return getattr(_DEFAULTS, name)


@click.command("train")
@click.option("--dataset", default=_default("dataset"), show_default=True,
              help="fer2013, fer2013_folder, ferplus, raf_db, affectnet7, affectnet8, folder, synthetic.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="The data set's folder as distributed (not needed for synthetic).")
@click.option("--workdir", type=click.Path(file_okay=False), default=_default("workdir"), show_default=True,
              help="Checkpoints, config.json and metrics.jsonl; an existing run here is resumed.")
@click.option("--pretrained", default=_default("pretrained"), show_default=True,
              help="Backbone weights: 'imagenet' (torchvision's resnet18, downloaded once into "
                   "$ARM_JAX_CACHE or ~/.cache/arm-jax), a resnet18 .pth/.safetensors file, an "
                   "arm-jax model or workdir, or 'none'.")
@click.option("--epochs", type=int, default=_default("epochs"), show_default=True)
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True,
              help="Global batch over all devices and hosts.")
@click.option("--eval-batch-size", type=int, default=_default("eval_batch_size"), show_default=True)
@click.option("--lr", type=float, default=_default("lr"), show_default=True)
@click.option("--gamma", type=float, default=None, help="Per-epoch lr decay [0.9, or 0.78 with --sampler mrr].")
@click.option("--weight-decay", type=float, default=_default("weight_decay"), show_default=True,
              help="L2 added to the gradient (torch Adam's weight_decay), not AdamW.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--image-size", type=int, default=_default("image_size"), show_default=True)
@click.option("--sampler", type=click.Choice(CHOICES["sampler"]), default=_default("sampler"), show_default=True)
@click.option("--dtype", type=click.Choice(CHOICES["dtype"]), default=_default("dtype"), show_default=True,
              help="Computation dtype; parameters and optimizer state stay float32.")
@click.option("--parallel", type=click.Choice(CHOICES["parallel"]), default=_default("parallel"),
              show_default=True, help="none: one device; pmap; jit: batch sharded over a device mesh.")
@click.option("--gar-mode", type=click.Choice(CHOICES["gar_mode"]), default=_default("gar_mode"),
              show_default=True, help="GAR at evaluation: the batch's (released code) or a running mean.")
@click.option("--eval-split", type=click.Choice(CHOICES["eval_split"]), default=_default("eval_split"),
              show_default=True, help="Split validated on after every epoch.")
@click.option("--workers", "worker_count", default="auto", show_default=True,
              callback=lambda ctx, param, value: worker_count_option(value),
              help="grain worker processes for reading and augmenting; auto: one per core beside this one.")
@click.option("--max-train-examples", type=int, default=None, help="Train on N random examples (quick runs).")
@click.option("--max-eval-examples", type=int, default=None, help="Validate on N random examples.")
@click.option("--checkpoint-every", "checkpoint_every_steps", type=int,
              default=_default("checkpoint_every_steps"), show_default=True,
              help="Also checkpoint every N steps (0: at epoch ends only).")
@click.option("--dropout", type=float, default=_default("dropout"), show_default=True)
@click.option("--no-arrangement", "arrangement", is_flag=True, flag_value=False, default=True,
              help="Ablation: no feature arrangement.")
@click.option("--no-de-albino", "de_albino", is_flag=True, flag_value=False, default=True,
              help="Ablation: no de-albino kernel.")
@click.option("--no-affinity", "affinity", is_flag=True, flag_value=False, default=True,
              help="Ablation: no sharing affinity.")
@click.option("--raw-kernel", type=int, default=_default("raw_kernel"), show_default=True,
              help="With --no-arrangement: De-albino's k x k kernel (stride 1) on the raw map (Figure 6).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events (needs tensorboardX).")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable records instead of stopping.")
@click.option("--distributed", is_flag=True, help="Multi-host: call jax.distributed.initialize().")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Debug messages, TFDS's own warnings included.")
def train(verbose: bool, **options) -> None:
    """Train ARM-ResNet18; re-running with the same --workdir resumes.

    SIGINT/SIGTERM finish the current step, save a checkpoint and exit with 128+signal.
    """
    from arm_jax.training.loop import train as run_training

    _log_to_stderr(verbose)
    # A UserError goes up to the `arm-jax` group, which prints it (exit code 2).
    summary = run_training(from_overrides(options))
    click.echo(json.dumps(summary))
    if summary["status"] == "interrupted":
        sys.exit(128 + summary["signum"])


def _log_to_stderr(verbose: bool = False) -> None:
    """The loop's one line per epoch on stderr; orbax/absl chatter stays at WARNING, without
    orbax's reports of a full disk (the command reports it once: OrbaxReportFilter).

    verbose: DEBUG, which also lets TFDS's warnings through (data.tfds_builders.quiet_tfds).
    """
    from arm_jax.training.checkpoints import OrbaxReportFilter

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, OrbaxReportFilter) for f in absl_logger.filters):
        absl_logger.addFilter(OrbaxReportFilter())
    logger = logging.getLogger("arm_jax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # some libraries give the root logger a handler too


def main() -> None:
    """`python -m cli.train ...`: the command alone, tuned and reporting UserError like the group."""
    from arm_jax import configure_cpu

    configure_cpu()  # before anything starts JAX's backend, as cli.main's group does
    try:
        train()
    except UserError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
