"""Errors that are the user's to fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """A user's mistake (bad option, bad file); the message names what to fix."""


class DatasetError(UserError):
    """A data set's files are missing or malformed; the message names the file and line."""
