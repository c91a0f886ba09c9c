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
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="An exported .onnx model (runs in onnxruntime, no JAX), a training workdir, a model directory "
                   "or a calibrated PyTorch file.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--detect-faces", is_flag=True,
              help="IMAGES are whole photos or videos (.mp4/.avi/.mov/.mkv): find the faces, predict each one.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Videos: look at every N-th frame.")
@click.option("--annotate", type=click.Path(path_type=Path), default=None,
              help="With --detect-faces: write each photo/video with boxes and labels into this folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "json_out", default=None, help="Write the predictions as JSON to FILE ('-' for standard output).")
def predict(checkpoint, images, detect_faces, every, annotate, batch_size, json_out):
    """The expression in each aligned face crop (IMAGE files or folders), or in each face found (--detect-faces)."""
    from arm_jax.errors import UserError
    from arm_jax.inference.predict import faces_table, predict as run_prediction, predict_faces
    from arm_jax.inference.report import prediction_table

    if not detect_faces:
        if annotate is not None or every != 1:
            raise UserError("--annotate and --every need --detect-faces")
        results = run_prediction(checkpoint, list(images), batch_size=batch_size)
        table = prediction_table(results)
    else:
        results = predict_faces(checkpoint, list(images), every=every, annotate=annotate)
        table = faces_table(results)
    if json_out:
        write_json(json.dumps([r.as_dict() if detect_faces else dataclasses.asdict(r) for r in results], indent=2),
                   json_out)
    if json_out != "-":
        click.echo(table)
