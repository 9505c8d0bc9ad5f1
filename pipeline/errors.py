"""One base class for every error a user can fix, mapped to a message and an exit code in one
place (``jobs.cli.main``). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input, config, data or environment: the message names the thing and the fix."""

    exit_code = 2
    """Process exit status the CLI returns for this error."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C (``sigterm_unwinds``), so that every
    ``finally`` and context manager on the way out runs: temporary folders, staging, the run
    folder's lease. Without it SIGTERM ends the process where it stands and leaks them."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


_unwinding = threading.Event()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread for the duration (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _unwinding.set()
    try:
        yield
    finally:
        _unwinding.clear()
        signal.signal(signal.SIGTERM, previous)


def keep_sigterm_unwinding() -> None:
    """Put ``sigterm_unwinds``' handler back where a library replaced it: ``ray.init`` installs
    its own (``sys.exit(15)``: no clean-up message, and Ray's crash dump at exit)."""
    if _unwinding.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """(signal name, exit status) of an interruption: SIGTERM 143, SIGINT 130 (128 + signal)."""
    return ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
