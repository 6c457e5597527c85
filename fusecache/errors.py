"""User-facing failures: one clear line naming the problem and the fix, no traceback."""


class QuietError(Exception):
    """An error the command line prints as one line and exits with `exitcode`."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.message
