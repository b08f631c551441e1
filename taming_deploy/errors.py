"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class UserError(Exception):
    """A problem with the user's input, files or environment, stated so that they can act on it."""
