"""One base class for every error a user can fix, mapped to a message and an exit code in one
place (``jobs.cli.main``). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, config, data or environment: the message names the thing and the fix."""

    exit_code = 2
    """Process exit status the CLI returns for this error."""
