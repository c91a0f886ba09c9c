"""`arm-jax export`."""

from pathlib import Path

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--stablehlo", is_flag=True,
              help="Also write OUTPUT with the suffix .stablehlo (jax.export for CPU, CUDA, ROCm and TPU, "
                   "batch symbolic, weights inside).")
def export(checkpoint, output, stablehlo):
    """An ONNX model (uint8 RGB images in, logits and probabilities out, running GAR built in) of CHECKPOINT.

    CHECKPOINT is a training workdir, a model directory (arm-jax convert/calibrate) or a PyTorch file
    (it needs a running GAR: run `arm-jax calibrate` on an authors' checkpoint first).
    """
    from arm_jax.interop.export import export_model

    for path in export_model(checkpoint, output, stablehlo=stablehlo):
        click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
