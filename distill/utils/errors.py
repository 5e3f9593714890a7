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


class UserNote(UserWarning):
    """Something the toolkit does on the user's behalf that they should know about (images resized, a
    metadata file that disagrees with the data). The command line prints each as one `note:` line, once."""


class ConfigDeprecationWarning(UserNote):
    """A config key or form still works but has a new spelling; the message says what to write instead."""
