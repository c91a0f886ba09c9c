"""The `arm-jax` command line: one sub-command per library entry point."""

import importlib
import sys

import click

from arm_jax import configure_cpu
from arm_jax.errors import UserError

# name -> "module:function". Commands are imported only when run, so that `arm-jax predict
# model.onnx` never imports JAX (the other commands' modules do, at import time).
COMMANDS = {
    "train": "cli.train:train",
    "evaluate": "cli.evaluate:evaluate",
    "predict": "cli.predict:predict",
    "calibrate": "cli.evaluate:calibrate",
    "prepare": "cli.data:prepare",
    "convert": "cli.convert:convert",
    "export": "cli.export:export",
    "reproduce": "cli.reproduce:reproduce",
    "serve": "cli.serve:serve",
}


class ArmJaxGroup(click.Group):
    """Applies the XLA:CPU tuning (arm_jax.configure_cpu), imports each command when it is used,
    and reports a UserError as a one-line message (exit code 2)."""

    def main(self, *args, **kwargs):
        # Before a command's module imports JAX: XLA_FLAGS is read when its backend starts.
        configure_cpu()
        return super().main(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), function)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)


@click.group(cls=ArmJaxGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ARM (Amend Representation Module) for facial expression recognition, in JAX."""
