"""User-facing errors.

Anything a user can cause (a bad file, a missing face, an unwritable path) is raised as
`TCCPError` with a one-line message that names the file and the problem. The CLI turns
it into `error: <message>` and a non-zero exit, never a traceback; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class TCCPError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
