"""TensorRT backend (TensorRT or TensorRT-RTX): runs a bundle's engine on a CUDA GPU.

Buffers the caller allocates (KV cache, adapter banks) live on the device and are bound by
address; small host feeds (ids, mask, positions) are copied into per-input device staging
buffers and host outputs (logits) come back through staging too. A step picks the decode
profile for one token per row and the prefill profile otherwise. A merged-mode engine built
with --refit swaps its merged adapter with a Refitter (`refit`), never a rebuild.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.manifest import EngineRecord, Manifest
from peft_export.bundle.paths import confined
from peft_export.bundle.safetensors_io import read_tensors
from peft_export.runtime.backends import trt_cuda, trt_plan
from peft_export.runtime.backends.base import (
    Backend,
    Buffer,
    Feed,
    IOSpec,
    KVStep,
    StepBinding,
    TensorView,
)
from peft_export.runtime.errors import InferenceError

MODULES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}


def installed_tensorrt() -> dict[str, Any]:
    """Importable TensorRT flavours by manifest backend name."""
    found = {}
    for backend, module_name in MODULES.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            found[backend] = importlib.import_module(module_name)
        except (ImportError, OSError):
            continue
    return found


class TrtBinding(StepBinding):
    """Per-caller execution context plus its staging buffers and stream."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.stream = trt_cuda.Stream()
        self.staging: dict[str, trt_cuda.DeviceBuffer] = {}
        self.in_flight: list[np.ndarray] = []
        """Host arrays of async uploads, alive until the stream is synchronized."""
        self.profile = -1

    def stage(self, name: str, dtype: np.dtype, size: int) -> trt_cuda.DeviceBuffer:
        buffer = self.staging.get(name)
        if buffer is None or buffer.capacity < size or buffer.dtype != dtype:
            buffer = trt_cuda.DeviceBuffer(dtype, max(size, 2 * (buffer.capacity if buffer else 0)))
            self.staging[name] = buffer
        return buffer


class TrtBackend(Backend):
    name = "trt"
    device = "cuda"

    def __init__(self, root: Path, manifest: Manifest, record: EngineRecord, trt: Any) -> None:
        self.root, self.manifest, self.record, self.trt = root, manifest, record, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        if record.lora_impl == "plugin":
            from peft_export.plugins import load_trt_plugin

            load_trt_plugin(trt)
        engine_file = confined(root, record.file)
        if not engine_file.is_file():
            raise InferenceError(
                f"{engine_file}: the bundle's engine is missing; rebuild it with "
                "'peft-export build-engine BUNDLE'"
            )
        data = engine_file.read_bytes()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise InferenceError(
                f"{record.file}: {record.backend} could not deserialize the engine (see its log); "
                "rebuild it with 'peft-export build-engine' on this machine"
            )
        self._specs = {spec.name: spec for spec in manifest.graph.inputs + manifest.graph.outputs}
        self._refit_modified: set[str] | None = None

    @classmethod
    def from_bundle(cls, root: Path, manifest: Manifest, **options: Any) -> TrtBackend:
        known = {"engine"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InferenceError(
                f"unknown TensorRT backend option(s) {', '.join(unknown)}; accepted: engine"
            )
        modules = installed_tensorrt()
        gpu = trt_cuda.compute_capability() if trt_cuda.device_count() > 0 else None
        installed = {name: str(module.__version__) for name, module in modules.items()}
        record = trt_plan.select_engine(manifest, installed, gpu, options.get("engine"))
        return cls(Path(root), manifest, record, modules[record.backend])

    def inputs(self) -> list[IOSpec]:
        return self._io(self.trt.TensorIOMode.INPUT)

    def outputs(self) -> list[IOSpec]:
        return self._io(self.trt.TensorIOMode.OUTPUT)

    def _io(self, mode: Any) -> list[IOSpec]:
        specs = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) != mode:
                continue
            dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
            declared = self._specs.get(name)
            shape = tuple(declared.shape) if declared else tuple(self.engine.get_tensor_shape(name))
            specs.append(IOSpec(name, np.dtype(dtype), shape))
        return specs

    def allocate(self, dtype: np.dtype, capacity: int, *, on_host: bool = False) -> Buffer:
        if on_host:
            return super().allocate(dtype, capacity, on_host=True)
        return trt_cuda.DeviceBuffer(dtype, capacity)

    def new_binding(self) -> TrtBinding:
        return TrtBinding(self.engine.create_execution_context())

    def run(
        self,
        binding: StepBinding,
        feeds: Mapping[str, Feed],
        outputs: Mapping[str, TensorView],
        kv: KVStep | None = None,
    ) -> None:
        assert isinstance(binding, TrtBinding)
        if kv is not None:
            kv_feeds, kv_outputs = kv.views()
            feeds, outputs = {**feeds, **kv_feeds}, {**outputs, **kv_outputs}
        context, stream = binding.context, binding.stream
        shapes = {
            name: tuple(np.shape(f) if isinstance(f, np.ndarray) else f.shape)
            for name, f in feeds.items()
        }
        profile = trt_plan.choose_profile(
            self.record, trt_plan.step_dims(self.manifest.graph, shapes)
        )
        if profile != binding.profile:
            context.set_optimization_profile_async(profile, stream.ptr)
            binding.profile = profile
        for name, feed in feeds.items():
            context.set_input_shape(name, shapes[name])
            context.set_tensor_address(name, self._device_address(binding, name, feed))
        host_outputs = []
        for name, view in outputs.items():
            if view.on_host:
                staging = binding.stage(name, view.dtype, int(np.prod(view.shape)))
                host_outputs.append((view, staging))
                context.set_tensor_address(name, staging.ptr)
            else:
                context.set_tensor_address(name, view.ptr)
        if not context.execute_async_v3(stream.ptr):
            raise InferenceError(
                "TensorRT failed to run a step (see its log); the request's shapes may exceed "
                "the engine's profiles"
            )
        for view, staging in host_outputs:
            trt_cuda.download(view.numpy(), staging.ptr, stream)
        stream.synchronize()
        binding.in_flight.clear()

    def _device_address(self, binding: TrtBinding, name: str, feed: Feed) -> int:
        if isinstance(feed, TensorView):
            if not feed.on_host:
                return feed.ptr
            feed = feed.numpy()
        array = np.ascontiguousarray(feed)
        staging = binding.stage(name, array.dtype, array.size)
        trt_cuda.upload(staging.ptr, array, binding.stream)
        binding.in_flight.append(array)
        return staging.ptr

    def check_steps(self, steps: Sequence[Mapping[str, int]]) -> None:
        for dims in steps:
            trt_plan.choose_profile(self.record, dims)

    def refit(self, name: str | None) -> None:
        """Make the engine's weights those of merged adapter `name` (None: the base model)."""
        if not self.record.refittable:
            raise InferenceError(
                f"{self.record.file} is not refittable; rebuild it with "
                "'peft-export build-engine BUNDLE --refit' to swap merged adapters"
            )
        base = _read_refit(self.root, names.REFIT_BASE)
        wanted = {} if name is None else _read_refit(self.root, name)
        modified = set(base) if self._refit_modified is None else self._refit_modified
        refitter = self.trt.Refitter(self.engine, self.logger)
        keep_alive = []
        for weight in sorted(modified | set(wanted)):
            value = wanted.get(weight, base.get(weight))
            if value is None:
                raise InferenceError(
                    f"refit set {name!r} and the base set disagree on {weight!r}; "
                    "re-add the adapter with 'peft-export adapters add'"
                )
            value = np.ascontiguousarray(value)
            keep_alive.append(value)
            if not refitter.set_named_weights(weight, self.trt.Weights(value)):
                raise InferenceError(
                    f"TensorRT refused refit weight {weight!r}; rebuild the engine"
                )
        if not refitter.refit_cuda_engine():
            raise InferenceError("TensorRT refit failed (see its log); rebuild the engine")
        self._refit_modified = set(wanted)

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "device": self.device,
            "engine": self.record.file,
            "tensorrt": f"{self.record.backend} {self.record.version}",
            "refittable": self.record.refittable,
        }


def _read_refit(root: Path, name: str) -> dict[str, np.ndarray]:
    path = confined(root, names.refit_file(name))
    if not path.is_file():
        raise InferenceError(
            f"no refit weights for {name!r} in the bundle; add the adapter with "
            "'peft-export adapters add' first"
        )
    return read_tensors(path)
