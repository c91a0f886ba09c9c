"""`arm-jax predict`."""

import dataclasses
import json
import sys
from pathlib import Path

import click


def write_json(text: str, destination: str) -> None:
    """`-` is standard output; anything else a file."""
    if destination == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(destination).write_text(text + "\n")


@click.command("predict")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "json_out", default=None, help="Write the predictions as JSON to FILE ('-' for standard output).")
def predict(checkpoint, images, batch_size, json_out):
    """The expression in each aligned face crop (IMAGE files or folders of them)."""
    from arm_jax.inference.predict import predict as run_prediction
    from arm_jax.inference.report import prediction_table

    predictions = run_prediction(checkpoint, list(images), batch_size=batch_size)
    if json_out:
        write_json(json.dumps([dataclasses.asdict(p) for p in predictions], indent=2), json_out)
    if json_out != "-":
        click.echo(prediction_table(predictions))
