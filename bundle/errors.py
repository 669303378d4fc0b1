"""Error types. Each layer raises one user-facing type; the CLI catches their common base."""


class PeftExportError(Exception):
    """Base of every user-facing error: the message is one line naming the problem and the fix."""


class BundleError(PeftExportError):
    """A bundle or adapter file on disk is missing, malformed, or does not fit."""
