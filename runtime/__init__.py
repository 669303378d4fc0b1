"""The lightweight runtime: loads bundles and generates, without torch/transformers/peft.

    from peft_export.runtime import load_bundle
    bundle = load_bundle("bundle/")
    print(bundle.generate(["Hi"], max_new_tokens=32).texts)

See runtime/README.md for the request API, backends and the input-provider hook.
"""

from peft_export.runtime.conversation import Conversation
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import InputProvider, RequestContext, Reservation, StepState
from peft_export.runtime.request import (
    GenerationRequest,
    GenerationResult,
    RowResult,
    SamplingOptions,
    TokenEvent,
)
from peft_export.runtime.session import Bundle, load_bundle

__all__ = [
    "Bundle",
    "Conversation",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InputProvider",
    "RequestContext",
    "Reservation",
    "RowResult",
    "SamplingOptions",
    "StepState",
    "TokenEvent",
    "load_bundle",
]
