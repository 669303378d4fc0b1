"""CPU steps as one batched ONNX Runtime call, without an IOBinding.

An IOBinding binds every tensor with its own call from Python: ~1.5 us each, and a decode
step of SmolLM2 binds 120 KV tensors whose shapes change every step (~0.2 ms beside a 5.5 ms
int4 step). `OrtValueVector.push_back_batch` wraps a whole list of (pointer, type, shape)
triples as OrtValues in one call (~0.3 us each), and `run_with_ortvaluevector` runs the
session on them, writing each output into the OrtValue given for it. Both are methods of
onnxruntime's Python extension that its public API does not wrap; where they are missing the
backend keeps the IOBinding (`batched_runs_available`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from peft_export.runtime.backends.base import Feed, KVStep, StepBinding, TensorView

HeldFeed = tuple[int, type, tuple[int, ...], Any]
"""(address, numpy scalar type, shape, the object that owns the memory)."""


def _extension() -> Any:
    from onnxruntime.capi import _pybind_state

    return _pybind_state


def batched_runs_available() -> bool:
    """Whether this onnxruntime's extension has the two methods the batched run needs."""
    try:
        extension = _extension()
    except ImportError:
        return False
    return hasattr(extension.InferenceSession, "run_with_ortvaluevector") and hasattr(
        extension.OrtValueVector, "push_back_batch"
    )


class OrtValueBinding(StepBinding):
    """Per-caller state of batched CPU runs.

    Feeds stay bound for later runs until a feed of the same name replaces them, as on an
    IOBinding (`Backend.retains_inputs`), so adapter banks are passed once by the caller; the
    binding passes them on with every run from lists it keeps (~0.3 us per tensor)."""

    def __init__(self, session: Any) -> None:
        extension = _extension()
        self._session = session._sess
        self._vector = extension.OrtValueVector
        self._run_options = extension.RunOptions()
        device = extension.OrtDevice
        self._cpu = device(device.cpu(), device.default_memory(), 0)
        self._held: dict[str, HeldFeed] = {}
        self._fetches: Any = None
        self.output_names: list[str] = []

    def run(
        self,
        feeds: Mapping[str, Feed],
        outputs: Mapping[str, TensorView],
        kv: KVStep | None,
    ) -> None:
        held = self._held
        for name, feed in feeds.items():
            if isinstance(feed, TensorView):
                held[name] = (feed.ptr, feed.dtype.type, feed.shape, feed.buffer)
            else:
                array = np.ascontiguousarray(feed)
                held[name] = (array.ctypes.data, array.dtype.type, array.shape, array)
        if kv is not None and kv.past and kv.past[0][0] in held:  # an earlier run fed views
            for name, _ in kv.past:
                del held[name]
        in_names, in_values = list(held), list(held.values())
        in_ptrs = [value[0] for value in in_values]
        in_types = [value[1] for value in in_values]
        in_shapes = [value[2] for value in in_values]
        out_names, out_views = list(outputs), list(outputs.values())
        out_ptrs = [view.ptr for view in out_views]
        out_types = [view.dtype.type for view in out_views]
        out_shapes = [view.shape for view in out_views]
        if kv is not None:
            for names, ptrs, types, shapes, pairs, shape in (
                (in_names, in_ptrs, in_types, in_shapes, kv.past, kv.past_shape),
                (out_names, out_ptrs, out_types, out_shapes, kv.present, kv.present_shape),
            ):
                if pairs:
                    names += [name for name, _ in pairs]
                    ptrs += [buffer.ptr for _, buffer in pairs]
                    types += [pairs[0][1].dtype.type] * len(pairs)
                    shapes += [shape] * len(pairs)
        values = self._vector()
        values.push_back_batch(
            [None] * len(in_ptrs), in_ptrs, in_types, in_shapes, [self._cpu] * len(in_ptrs)
        )
        fetches = self._vector()
        devices = [self._cpu] * len(out_ptrs)
        fetches.push_back_batch([None] * len(out_ptrs), out_ptrs, out_types, out_shapes, devices)
        self._fetches, self.output_names = fetches, out_names
        self._session.run_with_ortvaluevector(
            self._run_options, in_names, values, out_names, fetches, devices
        )

    def output_pointers(self) -> dict[str, int]:
        """Where the last run's outputs live (the given buffers, unless ONNX Runtime had to
        allocate new ones)."""
        if self._fetches is None:
            return {}
        pairs = zip(self.output_names, self._fetches, strict=True)
        return {name: value.data_ptr() for name, value in pairs}
