"""The runtime's user-facing error type."""

from peft_export.bundle.errors import PeftExportError


class InferenceError(PeftExportError):
    """A request or adapter the loaded bundle cannot serve (shape, profile, unknown adapter)."""
