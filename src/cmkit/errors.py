"""User-facing errors: one clear line naming the problem and what was expected."""


class CmkitError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""
