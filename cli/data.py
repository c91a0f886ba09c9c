"""`arm-jax prepare`: check a data set's files and write them as ArrayRecord for fast reading."""

import logging

import click

from arm_jax.data.sources import DATASETS

PREPARABLE = tuple(d for d in DATASETS if d != "synthetic")


@click.command("prepare")
@click.option("--dataset", required=True, type=click.Choice(PREPARABLE),
              help="Data set format, as distributed (raf_db, affectnet and fer2013_folder have "
                   "no validation split: val is their test set).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Folder holding the data set's files as distributed.")
@click.option("--tfds-data-dir", default=None, type=click.Path(file_okay=False),
              help="Where to write prepared data (default: $TFDS_DATA_DIR, else "
                   "~/tensorflow_datasets).")
@click.option("--skip-bad", is_flag=True,
              help="Leave out bad records (reported) instead of stopping at them.")
def prepare(dataset: str, data_dir: str, tfds_data_dir: str | None, skip_bad: bool) -> None:
    """Check every record of DATASET (full image decode) and write it with TFDS."""
    from arm_jax.data.prepared import prepare as prepare_  # imports tfds: slow

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = prepare_(dataset, data_dir, tfds_data_dir=tfds_data_dir, skip_bad=skip_bad)
    verb = "already prepared (source files unchanged)" if result.reused else "prepared"
    click.echo(f"{dataset} {verb}: {result.path}")
    for split, size in result.sizes.items():
        extra = []
        if result.skipped.get(split):
            extra.append(f"{result.skipped[split]} bad skipped")
        if result.dropped.get(split):
            extra.append(f"{result.dropped[split]} left out by the protocol")
        click.echo(f"  {split}: {size} records" + (f" ({', '.join(extra)})" if extra else ""))
