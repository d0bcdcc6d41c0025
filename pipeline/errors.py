"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration: the message names the file and the fix, on one line."""


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no message), at most 160 characters: for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
