"""Errors shared across the package: `QuietError` (a command-line failure: one clear line
naming the problem and the fix, no traceback) and `CommandError` (a control-socket request
the daemon refuses: its message goes back to the client)."""


from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class QuietError(Exception):
    """An error the command line prints as one line and exits with `exitcode`."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.message


class CommandError(Exception):
    """A control request the daemon refuses: its message goes back to the client as one line."""


def find_in(exc: BaseException, cls: type[E]) -> E | None:
    """`exc` itself or the first exception of type `cls` inside its (nested) exception groups."""
    if isinstance(exc, cls):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find_in(inner, cls)) is not None:
                return found
    return None
