"""The one exception type the CLI turns into a one-line message instead of a traceback."""

import re

# a terminal control sequence (ESC [ ... letter): bold, colour, reset
_TERMINAL_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UserError(Exception):
    """Bad input or configuration: the message names the file and the fix, on one line."""


def first_line(e: BaseException, most: int = 160) -> str:
    """An exception's first line (its type when it has no message), for one-line errors, cut to `most` characters as
    `cut` does. Terminal codes are dropped:
    torch's "Weights only load failed" line turns bold on, and a cut before its reset left the terminal bold."""
    return cut((_TERMINAL_CODE.sub("", str(e)).strip().splitlines() or [type(e).__name__])[0], most)


def cut(line: str, most: int = 160) -> str:
    """line, at most `most` characters: a cut one ends in "..." (so that a number cut short is not read as a smaller
    one)."""
    return line if len(line) <= most else line[: most - 3] + "..."
