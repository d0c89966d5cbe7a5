"""SIGTERM ends a command like Ctrl-C does: by unwinding, so temporary directories (tune, deploy)
and half-written temp files are removed on the way out.

The handler raises ``SystemExit``; raised inside a Python callback that TVM's C++ called (the
tuner's in-process builder, a schedule rule, a pass), TVM's FFI hands it back to Python as an
ordinary ``RuntimeError``. So the status is also kept here: the CLI returns it whatever exception
reaches it, and code that turns exceptions into results (a build that fails is a failed trial)
asks :func:`status` first and lets the exception go on.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["handle_sigterm", "status"]

_status: list[int] = []  # the shell's status of a SIGTERM being handled


def _terminated(signum: int, _frame: FrameType | None) -> None:
    _status.append(128 + signum)
    raise SystemExit(128 + signum)


def handle_sigterm() -> Callable[[int, FrameType | None], object] | int | None:
    """Install the handler (main thread only) with no termination pending; returns the previous
    handler, for ``signal.signal(signal.SIGTERM, previous)``."""
    _status.clear()
    return signal.signal(signal.SIGTERM, _terminated)


def status() -> int | None:
    """The exit status of the SIGTERM being handled, or None."""
    return _status[0] if _status else None
