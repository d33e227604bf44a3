"""The one exception type users see.

Every expected failure (bad config, missing data, wrong checkpoint, unknown
name, diverging loss, existing run directory) raises :class:`KdkitError` with a
one-line message that names what was wrong and what was expected. The CLI
prints it as ``error: <message>`` and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class KdkitError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
