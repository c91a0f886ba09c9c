"""Convert weights: `python scripts/convert_weights.py IN OUT` (the same as `arm-jax convert IN OUT`).

IN a torchvision resnet18 / authors' ARM .pth, .pt or .safetensors -> OUT an arm-jax
model directory; IN an arm-jax model directory -> OUT.safetensors for PyTorch.
"""

from cli.main import cli

if __name__ == "__main__":
    cli(["convert", *__import__("sys").argv[1:]], prog_name="convert_weights.py")
