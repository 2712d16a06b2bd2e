"""The errors circtune raises for what a user asked for (not for what went wrong while measuring).

Every one is a ``ValueError``: a library caller catches ``ValueError``; the CLI turns them into one line on stderr
and exit status 2.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user asked for: one line, exit status 2."""


class OptionError(UsageError):
    """An option value refused; :attr:`option` is its name as the library spells it (``min_fill``), the message
    names it as the command line does (``--min-fill``) and says what is accepted."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
