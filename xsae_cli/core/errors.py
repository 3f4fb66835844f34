"""User mistakes as one exception type, so the CLI can print one line and exit 2.

Library code raises :class:`XsaeError` for anything the *user* can fix (bad path, unknown model,
bad config key, shape mismatch, corrupt file). Bugs stay ordinary exceptions and keep their
tracebacks. The CLI turns an XsaeError into ``error: <what>. <fix>`` on stderr.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class XsaeError(Exception):
    """A mistake the user can fix; ``hint`` says how."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += ". " + self.hint.rstrip(".")
        # One line, whatever the message held: newlines in paths or library text would break it.
        return " ".join(text.split("\n"))


EXIT_INTERRUPTED = 130


class Interrupted(XsaeError):
    """Ctrl-C after the work so far was saved: exit 130 (an interrupt is not a user error), with what was kept."""

    exit_code = EXIT_INTERRUPTED
