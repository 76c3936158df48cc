"""The one base class of user-facing errors.

Bad input (a missing or corrupt file, an unknown config key, a value out of range) raises a
subclass of `InputError` whose message names the file, key or path; every command-line
entry point turns it into one `error:` line and a non-zero exit (`data/cli.py`). It sits in
the lowest layer so that every layer can raise it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message names the file, key or path at fault."""


class ConfigError(InputError):
    """A bad config file, key or value; the message names it."""
