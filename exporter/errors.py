"""The exporter's user-facing error type."""

from peft_export.bundle.errors import PeftExportError


class ExportError(PeftExportError):
    """Bad export input (base, adapter, options) or an export that cannot be done as asked."""
