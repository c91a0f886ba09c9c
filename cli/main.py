"""The `arm-jax` command line: one sub-command per library entry point."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ARM (Amend Representation Module) for facial expression recognition, in JAX."""
