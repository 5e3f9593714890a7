"""Developer tools that are not part of the installed toolkit (the error catalogue generator behind
docs/errors.md)."""
