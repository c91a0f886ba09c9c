"""`arm-jax convert`: PyTorch weights -> an arm-jax model directory, or back to .safetensors."""

from pathlib import Path

import click

from arm_jax.interop.convert import NAMINGS


@click.command("convert")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--class-names", default=None, help="Comma-separated class names, in label order.")
@click.option("--model-classes", default=None,
              help="Instead of --class-names: the data set whose class order the model was trained in "
                   "(fer2013, ferplus, raf_db, affectnet7, affectnet8, ...).")
@click.option("--image-size", type=int, default=None, help="Input size the model is run at (default: inferred, 224).")
@click.option("--naming", type=click.Choice(NAMINGS), default="authors", show_default=True,
              help="Key names when exporting to .safetensors.")
def convert(source: Path, destination: Path, class_names: str | None, model_classes: str | None,
            image_size: int | None, naming: str) -> None:
    """Convert SOURCE to DESTINATION.

    SOURCE `imagenet`: torchvision's ImageNet resnet18 (resnet18-f37072fd.pth), downloaded
    once into $ARM_JAX_CACHE or ~/.cache/arm-jax ($ARM_JAX_IMAGENET_URL: another address).

    SOURCE a .pth/.pt/.safetensors file (torchvision resnet18, or a checkpoint of
    the authors' ARM code) -> DESTINATION an arm-jax model directory.
    SOURCE an arm-jax model directory or training workdir -> DESTINATION a
    .safetensors file that PyTorch code loads.
    """
    from arm_jax.data.classes import given_class_names
    from arm_jax.interop.downloads import resolve_weights
    from arm_jax.interop.jobs import convert_job

    names = given_class_names(class_names or None, model_classes)
    message = convert_job(resolve_weights(source), destination, class_names=names, image_size=image_size, naming=naming)
    click.echo(message)
