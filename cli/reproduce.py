"""`arm-jax reproduce TARGET`: parse options into reproduce.plan.Options and call reproduce.job.reproduce."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from arm_jax.reproduce.plan import DTYPES, LAUNCHERS, Options, data_root_option_help
from arm_jax.reproduce.targets import RECIPE, TARGETS

_INTEGER = re.compile(r"^-?\d+$")


def expand_seeds(args: list[str]) -> list[str]:
    """`--seeds 0 1 2` -> `--seeds 0 --seeds 1 --seeds 2` (click options take one value per use)."""
    expanded, taking, given = [], False, 0
    for word in args:
        if taking and _INTEGER.match(word):
            expanded += ["--seeds", word]
            given += 1
            continue
        if taking and not given:
            expanded.append("--seeds")  # `--seeds` without a number: click reports it
        taking, given = word == "--seeds", 0
        if not taking:
            expanded.append(word)
    if taking and not given:
        expanded.append("--seeds")
    return expanded


class _SeedsCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_seeds(args))


@click.command("reproduce", cls=_SeedsCommand)
@click.argument("target", type=click.Choice(TARGETS))
@click.option("--data-root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help=data_root_option_help())
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder: one training workdir per row and seed, results.md/json, figures.")
@click.option("--seeds", type=int, multiple=True, help="Seeds, e.g. --seeds 0 1 2 (mean and sd per row)  [default: 0]")
@click.option("--epochs", type=int, default=RECIPE["epochs"], show_default=True, help="Fewer to scale a run down.")
@click.option("--image-size", type=int, default=RECIPE["image_size"], show_default=True,
              help="Smaller to scale a run down (rows whose kernel no longer fits are named and left out).")
@click.option("--batch-size", type=int, default=RECIPE["batch_size"], show_default=True)
@click.option("--pretrained", default=RECIPE["pretrained"], show_default=True,
              help="Backbone: imagenet (the paper's), a resnet18 .pth/.safetensors, or none.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: bfloat16 on a GPU (and under --launcher slurm), float32 on a CPU.")
@click.option("--workers", default="auto", show_default=True, help="grain worker processes per training run.")
@click.option("--rows", default="", help="Only these rows, comma-separated (see --dry-run for their names).")
@click.option("--skip-missing", is_flag=True, help="Run the rows whose data set is present; name the others.")
@click.option("--dry-run", is_flag=True, help="Print each row's arm-jax commands; run and write nothing.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="local", show_default=True,
              help="slurm: write OUT/TARGET/slurm.sh, an sbatch array of one task per row and seed.")
@click.option("--collect", is_flag=True, help="Train nothing: gather what the rows' workdirs hold (after SLURM).")
def reproduce(target, data_root, out, seeds, epochs, image_size, batch_size, pretrained, dtype, workers, rows,
              skip_missing, dry_run, launcher, collect):
    """Reproduce the paper's TARGET: table3, table2 or fig6, each row a training workdir under --out.

    Running the same command again skips finished rows and resumes an interrupted one. Results
    (results.md, results.json, figures) stand beside the paper's numbers with the epochs, image
    size, precision and device they ran with.
    """
    from arm_jax.reproduce.job import reproduce as run_job
    from cli.train import _log_to_stderr

    _log_to_stderr()
    options = Options(target=target, data_root=data_root, out=out, seeds=tuple(seeds) or (0,), epochs=epochs,
                      image_size=image_size, batch_size=batch_size, pretrained=pretrained, dtype=dtype,
                      workers=workers, rows=tuple(name for name in rows.split(",") if name),
                      skip_missing=skip_missing, launcher=launcher)
    result = run_job(options, dry_run=dry_run, collect=collect)
    click.echo(result.text)
    if result.interrupted_signum:
        sys.exit(128 + result.interrupted_signum)
