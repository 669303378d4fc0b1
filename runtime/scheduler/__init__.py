"""Continuous batching across requests and adapters (no torch).

    from peft_export.runtime import load_bundle
    from peft_export.runtime.scheduler import Scheduler, SchedulerConfig, ServeRequest

    bundle = load_bundle("bundle/")
    with Scheduler(bundle, SchedulerConfig(max_rows=16)) as scheduler:
        handle = scheduler.submit(ServeRequest(prompt_ids=ids, adapter="fr", max_tokens=32))
        for event in handle.events():
            print(event.token_id, event.text, event.finish_reason)

The policy (queue, admission, retirement: `core.py`) is separate from the model execution
(`batch_runner.py`, the KV pool in `kv_pool.py`) and from adapter paging (`paging.py`).
"""

from peft_export.runtime.errors import (
    ContextLengthError,
    QueueFullError,
    SchedulerClosedError,
    UnknownAdapterError,
)
from peft_export.runtime.scheduler.api import (
    FINISH_REASONS,
    Observer,
    RequestHandle,
    SchedulerConfig,
    ServeEvent,
    ServeRequest,
    ServeResult,
)
from peft_export.runtime.scheduler.core import Scheduler

__all__ = [
    "FINISH_REASONS",
    "ContextLengthError",
    "Observer",
    "QueueFullError",
    "RequestHandle",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "ServeEvent",
    "ServeRequest",
    "ServeResult",
    "UnknownAdapterError",
]
