"""The one user-facing error type: its message is one line that names the culprit and the fix."""


class BcpkdError(Exception):
    """Bad input: the CLI prints `error: <message>` and exits with code 2."""


class BcpkdFailure(Exception):
    """A run that failed through no fault of its input: the CLI prints `failed: <message>`, exit code 1."""
