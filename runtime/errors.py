"""The runtime's user-facing error types.

`InferenceError` is the one to catch. The scheduler raises the subtypes below so a server can
map each to its own status without parsing messages: unknown adapter -> 404, prompt too long
-> 400, queue full or scheduler closed -> 503, any other InferenceError -> 400.
"""

from peft_export.bundle.errors import PeftExportError


class InferenceError(PeftExportError):
    """A request or adapter the loaded bundle cannot serve (shape, profile, unknown adapter)."""


class UnknownAdapterError(InferenceError):
    """A request names an adapter the bundle does not hold (or no longer holds)."""


class ContextLengthError(InferenceError):
    """A prompt plus its max_tokens exceeds the model's context or the scheduler's KV pool."""


class QueueFullError(InferenceError):
    """The scheduler's queue holds `max_queue` requests already; retry later."""


class SchedulerClosedError(InferenceError):
    """The scheduler is closed (or not started) and takes no new requests."""
