"""The one family of errors a user can act on.

Every stage raises a subclass of `MagicError` for a problem the user can fix (a bad file, row, field or
setting, an unreachable service). Its message is written for the user: it names the file, row or field and
what was expected. The command line prints that message as one line and exits with code 2, in one place
(`cli.MagicGroup`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MagicError(Exception):
    """A problem the user can fix; the message says what and where."""
