"""Errors subcache raises. Each also subclasses the built-in a caller would catch for the same problem.

The library raises these with a one-line message that says what was wrong and what is allowed; the CLI turns
them into a clean exit (no traceback).
"""
from __future__ import annotations


class SubcacheError(Exception):
    """Base class of every error subcache raises on purpose."""


class UnknownModelError(SubcacheError, ValueError):
    """The model name is not one subcache knows."""


class UntrustedCodeError(SubcacheError, PermissionError):
    """A store or task names code (a model factory) that the user did not allow subcache to run."""


class BlockError(SubcacheError, ValueError):
    """A block (index, name, range) does not exist or cannot be used here."""


class WeightsError(SubcacheError, FileNotFoundError):
    """Weights are missing, unreadable or do not fit the model."""


class DataError(SubcacheError, ValueError):
    """A dataset is missing, malformed, or a selection of it is empty."""


class StoreError(SubcacheError, OSError):
    """A cache store on disk cannot be used as asked (missing, unreadable, damaged, locked)."""


class CorruptChunkError(StoreError, ValueError):
    """A chunk of a cache array fails to decode (its checksum or its codec says the bytes are damaged)."""


class MissingChunkError(CorruptChunkError):
    """A chunk object of a complete store is not there (zarr itself would read it as the fill value)."""


class StoreExistsError(StoreError, FileExistsError):
    """The output exists and --overwrite/--resume was not given."""


class IncompleteStoreError(StoreError):
    """The store was not finished (a build was interrupted); an OSError like every StoreError."""


class ForeignStoreError(StoreError, ValueError):
    """The path is not a subcache store, or it does not match the backbone/task it meets."""


class TaskError(SubcacheError, ValueError):
    """A saved task is malformed or does not fit the backbone/cache."""


class OutputExistsError(SubcacheError, FileExistsError):
    """An output file or task exists and --overwrite was not given."""


class TrainingError(SubcacheError, RuntimeError):
    """Training could not go on (for example the loss stopped being finite)."""


class ConfigError(SubcacheError, ValueError):
    """An option's value is not allowed (out of range, not finite, conflicting with another option, an unknown
    device or precision) or not available on this machine."""
