"""The one error type users see: a one-line message naming the problem and the fix."""


class AmpruneError(ValueError):
    """A bad request or input, reported by the CLI as one line and exit code 2."""
