"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class BaseqError(Exception):
    """An error caused by the user's input or environment, with a message meant for them."""
