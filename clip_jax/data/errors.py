"""Errors of the data package: one line, naming the path or field and what was expected."""

from clip_jax.errors import UserError


class DataError(UserError):
    """Bad input data or arguments (missing/empty/unreadable source, unknown field...)."""


class DatasetNotPreparedError(DataError, FileNotFoundError):
    """A dataset (or split) is not in data_dir; the message holds the command to prepare it."""
