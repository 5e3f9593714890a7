"""Errors meant for people: each says what was wrong, where (file, key, record) and what to do.

The command line prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class DistillError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ConfigError(DistillError, ValueError):
    """An experiment file, override or argument is wrong (names the key, file and value)."""


class DataFormatError(DistillError, ValueError):
    """A data file (RecordIO, .bin, image tree) is malformed (names the file, key and offset)."""


class UnsafeFileError(DistillError, ValueError):
    """A file asks to run code or build arbitrary objects when loaded; it is refused unopened."""


class CheckpointError(DistillError, ValueError):
    """A checkpoint does not match the model it is loaded into, or cannot be read safely."""


class UnknownNameError(DistillError, KeyError):
    """A name (model, loss, head, teacher kind) is not registered; the message lists the known ones."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigDeprecationWarning(UserWarning):
    """A config key or form still works but has a new spelling; the message says what to write instead."""
