"""The `arm-jax` command line: one sub-command per library entry point."""

import sys

import click

from arm_jax.errors import UserError
from cli.convert import convert
from cli.data import prepare
from cli.evaluate import calibrate, evaluate
from cli.predict import predict
from cli.train import train


class ArmJaxGroup(click.Group):
    """Reports a UserError as a one-line message (exit code 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)


@click.group(cls=ArmJaxGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ARM (Amend Representation Module) for facial expression recognition, in JAX."""


for command in (train, evaluate, predict, calibrate, prepare, convert):
    cli.add_command(command)
