"""Exceptions that mean "the user asked for something that cannot work".

The CLI turns a :class:`UserError` into a one-line message on stderr and a
non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a flag, a file, a folder or a setting.

    The message must name the offending file, flag or setting and say what is
    wrong with it, in one line.

    Examples:
        >>> raise UserError("--data /nope: folder does not exist")
        Traceback (most recent call last):
        ...
        birdnet_stm32.errors.UserError: --data /nope: folder does not exist
    """
