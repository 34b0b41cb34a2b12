"""The one user-facing error type: its message is one line that names the culprit and the fix."""


class BcpkdError(Exception):
    """Bad input: the CLI prints `error: <message>` and exits with code 2."""
