"""The exception types the CLI turns into a one-line message and exit code 2 (and the service into a 4xx)."""

MAX_MESSAGE = 1000  # characters; a longer message is cut (paths and values in it are already cut shorter)


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name, say) escaped, cut to MAX_MESSAGE."""
    line = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


class UserError(Exception):
    """A problem with the user's input, files or environment, stated so that they can act on it.

    The message is one line by construction: whatever a caller interpolates (a path with a newline, an
    exception's text) cannot split it."""

    def __init__(self, message: object = ""):
        super().__init__(one_line(str(message)))


class RequestTooLarge(UserError):
    """A request over a size limit (pixels, images, bytes): HTTP 413 rather than 400 in the service."""
