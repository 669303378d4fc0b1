"""ONNX Runtime backend: CPU, and the CUDA execution provider when onnxruntime-gpu has it.

Every step's inputs and outputs point into buffers the caller allocated once, so the KV
cache and the logits are never re-allocated between steps: on the CPU through one batched
call (ort_values.py), on CUDA through an IOBinding.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.graph_file import load_graph
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.runtime import huge_pages
from peft_export.runtime.backends.base import (
    Backend,
    Buffer,
    Feed,
    IOSpec,
    KVStep,
    StepBinding,
    TensorView,
)
from peft_export.runtime.backends.ort_values import OrtValueBinding, batched_runs_available
from peft_export.runtime.errors import InferenceError

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
DISABLED_OPTIMIZERS = "optimization.disable_specified_optimizers"
DISABLED_ON_CPU = "SkipLayerNormFusion"
"""ONNX Runtime's session optimizer turns Add + Add + LayerNormalization into its
SkipLayerNormalization, whose CPU kernel measured slower than the ops it replaces (MiniLM batch
32: 981 vs 915 ms CPU time; runtime/README.md); CPU sessions keep the plain ops."""

BATCHED_MAX_HELD = 8
"""CPU graphs with at most this many more inputs than outputs run batched (ort_values.py):
nearly every input is a per-step tensor. The rest hold adapter banks (hundreds of inputs that
stay bound), which an IOBinding keeps bound for free while a batched run passes them again
every step: SmolLM2 int4 runtime-LoRA 7.93 ms a step batched vs 7.75 ms bound, merged
6.02-6.06 vs 6.12 ms (interleaved A/B in one process)."""


@dataclass
class OrtOptions:
    """Session options; the defaults are the fast ones for CPU decoding.

    `denormals_as_zero` flushes denormal floats to zero: on some CPUs adapter math that
    produces denormals runs several times slower without it (docs/environment.md). It can
    change results in the last bits only for values below ~1e-38. ONNX Runtime also leaves
    flush-to-zero on in the thread that created the session (see runtime/README.md).
    """

    device: str = "cpu"
    """"cpu", or "cuda" (needs onnxruntime-gpu with CUDAExecutionProvider)."""
    threads: int | None = None
    """Intra-op threads; None: the cores this process may use."""
    denormals_as_zero: bool = True
    optimization: str = "all"
    """"all", "extended", "basic" or "disabled": ONNX Runtime graph optimization level."""
    extra_config: dict[str, str] = field(default_factory=dict)
    """Raw session config entries (`SessionOptions.add_session_config_entry`)."""
    huge_pages: bool = True
    """CPU only: after loading, move the memory the session allocated (its weights) onto
    2 MiB pages (runtime/huge_pages.py), on a background thread: ~1-2 s per GB once, while
    the first requests already run; decode steps then miss the TLB far less."""
    quant_accuracy: int | None = None
    """Quantized bundles: ONNX Runtime's compute for their MatMuls, None for the bundle's
    own (manifest): 4 quantizes activations to int8 (fast), 1 computes in float32 on the
    dequantized weights (exact; what `verify` uses)."""
    multilora_kernel: str = "auto"
    """MultiLoRA nodes of fp32 graphs on the CPU: "auto" runs the CPU kernel library
    (plugins/multilora, libpeft_multilora_ort.so) when it is built, else the op's ONNX
    function body; "on" requires the library; "off" always runs the function body."""


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class OrtBinding(StepBinding):
    """An IOBinding that binds by pointer (KV shapes grow by one each step).

    A binding stays in place between runs, so a tensor bound again with the same address,
    shape and dtype (adapter banks: hundreds per step) is skipped. The public
    `IOBinding.bind_input/bind_output` build a Python `OrtDevice` per call; when
    onnxruntime exposes its native binding (`_iobinding`), device objects are made once.
    """

    def __init__(self, io_binding: Any) -> None:
        self.io = io_binding
        self.output_names: list[str] = []
        self._native = getattr(io_binding, "_iobinding", None)
        self._devices: dict[tuple[str, int], Any] = {}
        self._bound: dict[tuple[str, bool], tuple[int, tuple[int, ...], np.dtype]] = {}

    def bind_host_array(self, name: str, array: np.ndarray) -> None:
        self._bound.pop((name, False), None)
        self.io.bind_cpu_input(name, np.ascontiguousarray(array))

    def bind(self, name: str, view: TensorView, device_id: int, *, output: bool) -> None:
        key, bound = (name, output), (view.ptr, view.shape, view.dtype)
        if self._bound.get(key) == bound:
            return
        self._bound.pop(key, None)
        device = _device(view)
        if self._native is None:
            bind = self.io.bind_output if output else self.io.bind_input
            bind(name, device, device_id, view.dtype.type, view.shape, view.ptr)
        else:
            native_device = self._native_device(device, device_id)
            bind = self._native.bind_output if output else self._native.bind_input
            bind(name, native_device, view.dtype.type, view.shape, view.ptr)
        self._bound[key] = bound

    def bind_kv(self, kv: KVStep, device_id: int) -> None:
        """Bind a step's KV cache in one loop: no view objects, no per-tensor cache check
        (the shapes change every step anyway)."""
        if self._native is None or not kv.past and not kv.present:
            feeds, outputs = kv.views()
            for name, view in feeds.items():
                self.bind(name, view, device_id, output=False)
            for name, view in outputs.items():
                self.bind(name, view, device_id, output=True)
            return
        first = (kv.past or kv.present)[0][1]
        device = self._native_device("cpu" if first.on_host else "cuda", device_id)
        dtype, bound = first.dtype.type, self._bound
        bind_input, bind_output = self._native.bind_input, self._native.bind_output
        past_shape, present_shape = kv.past_shape, kv.present_shape
        for name, buffer in kv.past:
            bind_input(name, device, dtype, past_shape, buffer.ptr)
            bound.pop((name, False), None)
        for name, buffer in kv.present:
            bind_output(name, device, dtype, present_shape, buffer.ptr)
            bound.pop((name, True), None)

    def run(
        self,
        session: Any,
        feeds: Mapping[str, Feed],
        outputs: Mapping[str, TensorView],
        kv: KVStep | None,
        device_id: int,
    ) -> None:
        for name, feed in feeds.items():
            if isinstance(feed, TensorView):
                self.bind(name, feed, device_id, output=False)
            else:
                self.bind_host_array(name, feed)
        for name, view in outputs.items():
            self.bind(name, view, device_id, output=True)
        self.output_names = list(outputs)
        if kv is not None:
            self.bind_kv(kv, device_id)
            self.output_names += [name for name, _ in kv.present]
        session.run_with_iobinding(self.io)

    def output_pointers(self) -> dict[str, int]:
        values = self.io.get_outputs()
        pairs = zip(self.output_names, values, strict=True)
        return {name: value.data_ptr() for name, value in pairs}

    def _native_device(self, device: str, device_id: int) -> Any:
        native_device = self._devices.get((device, device_id))
        if native_device is None:
            import onnxruntime as ort

            native_device = ort.OrtDevice.make(device, device_id)._get_c_device()
            self._devices[(device, device_id)] = native_device
        return native_device


class OrtDeviceBuffer(Buffer):
    """A flat buffer in CUDA memory, owned by an OrtValue."""

    def __init__(self, dtype: np.dtype, capacity: int, device_id: int) -> None:
        import onnxruntime as ort

        super().__init__(dtype, capacity, on_host=False)
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(
            [max(capacity, 1)], self.dtype.type, "cuda", device_id
        )

    @property
    def ptr(self) -> int:
        return self.value.data_ptr()


class OrtBackend(Backend):
    name = "ort"
    retains_inputs = True

    def __init__(
        self,
        graph_path: str | Path | bytes,
        options: OrtOptions | None = None,
        *,
        multilora_fp32: bool = False,
    ) -> None:
        """`multilora_fp32`: the graph has fp32 MultiLoRA nodes that the CPU kernel can run."""
        import onnxruntime as ort

        self.options = options or OrtOptions()
        self.device = self.options.device
        self.device_id = 0
        providers = self._providers(ort)
        session_options = self._session_options(ort)
        self.multilora_library = self._multilora_library(multilora_fp32)
        if self.multilora_library is not None:
            try:
                session_options.register_custom_ops_library(str(self.multilora_library))
            except Exception as exc:  # ORT raises private exception types
                raise InferenceError(
                    f"{self.multilora_library}: ONNX Runtime could not load the MultiLoRA CPU "
                    f"kernel ({_first_line(exc)}); rebuild it, or pass multilora_kernel='off'"
                ) from None
        collapse = self.options.huge_pages and self.device == "cpu"
        before = huge_pages.anonymous_ranges() if collapse else []
        try:
            self.session = ort.InferenceSession(
                graph_path if isinstance(graph_path, bytes) else str(graph_path),
                sess_options=session_options,
                providers=providers,
            )
        except Exception as exc:  # ORT raises several private exception types
            where = "the graph" if isinstance(graph_path, bytes) else graph_path
            raise InferenceError(
                f"{where}: ONNX Runtime could not load the graph ({_first_line(exc)}); "
                "re-export the bundle with this onnxruntime version installed"
            ) from None
        self._collapse: huge_pages.Collapse | None = None
        self._collapse_waiting = collapse
        if collapse:
            grown = huge_pages.new_ranges(before, huge_pages.anonymous_ranges())
            self._collapse = huge_pages.Collapse(grown)
        self._inputs = [_spec(arg) for arg in self.session.get_inputs()]
        self._outputs = [_spec(arg) for arg in self.session.get_outputs()]
        self._batched = (
            self.device == "cpu"
            and len(self._inputs) - len(self._outputs) <= BATCHED_MAX_HELD
            and batched_runs_available()
        )

    @property
    def huge_page_bytes(self) -> int:
        """Session memory moved onto huge pages (waits for the background move to end)."""
        return self._collapse.bytes if self._collapse is not None else 0

    @classmethod
    def from_bundle(cls, root: Path, manifest: Manifest, **options: Any) -> OrtBackend:
        known = {f.name for f in dataclasses.fields(OrtOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InferenceError(
                f"unknown ORT backend option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known))}"
            )
        if manifest.precision == "bf16":
            raise InferenceError(
                "bf16 bundles do not run on ONNX Runtime's CPU kernels; re-export with "
                "--precision fp32 (or fp16), or use the TensorRT backend"
            )
        graph = confined(root, manifest.graph.file)
        if not graph.is_file():
            raise InferenceError(f"{graph}: the bundle's graph is missing; re-export the bundle")
        multilora_fp32 = manifest.precision == "fp32" and any(
            (split := names.split_lora_input(t.name)) is not None and split[1] == "A"
            for t in manifest.graph.inputs
        )
        ort_options = OrtOptions(**options)
        source: Path | bytes = graph
        quantization = manifest.quantization
        if quantization is not None:
            level = ort_options.quant_accuracy
            if level is None:
                level = quantization.accuracy_level
            # ONNX Runtime fuses block-wise DequantizeLinear -> MatMul into MatMulNBits at
            # the level this session config names; written-out MatMulNBits nodes carry theirs.
            ort_options.extra_config = {QDQ_ACCURACY_KEY: str(level), **ort_options.extra_config}
            if quantization.format == "matmulnbits" and level != quantization.accuracy_level:
                source = _with_accuracy_level(graph, level)
        return cls(source, ort_options, multilora_fp32=multilora_fp32)

    def _providers(self, ort: object) -> list[str]:
        available = ort.get_available_providers()
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise InferenceError(
                    "device 'cuda' needs ONNX Runtime's CUDAExecutionProvider, which this "
                    "onnxruntime lacks; pip install onnxruntime-gpu, or use device='cpu'"
                )
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        raise InferenceError(f"unknown ORT device {self.device!r}; use 'cpu' or 'cuda'")

    def _multilora_library(self, multilora_fp32: bool) -> Path | None:
        """The CPU kernel library to register, or None to run the ONNX function body."""
        mode = self.options.multilora_kernel
        if mode not in ("auto", "on", "off"):
            raise InferenceError(f"unknown multilora_kernel {mode!r}; use 'auto', 'on' or 'off'")
        if mode == "off" or not multilora_fp32 or self.device != "cpu":
            if mode == "on":
                raise InferenceError(
                    "multilora_kernel='on' needs an fp32 runtime-adapter bundle on device "
                    "'cpu'; use multilora_kernel='auto'"
                )
            return None
        from peft_export.plugins import ORT_OP_LIBRARY, PluginError, find_library

        try:
            return find_library(ORT_OP_LIBRARY)
        except PluginError as exc:
            if mode == "on":
                raise InferenceError(str(exc)) from None
            return None

    def _session_options(self, ort: object) -> object:
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if self.options.optimization not in levels:
            raise InferenceError(
                f"unknown optimization level {self.options.optimization!r}; "
                f"use one of {', '.join(levels)}"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.options.optimization]
        so.intra_op_num_threads = self.options.threads or available_cores()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if self.options.denormals_as_zero:
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
        if self.device == "cpu" and DISABLED_OPTIMIZERS not in self.options.extra_config:
            so.add_session_config_entry(DISABLED_OPTIMIZERS, DISABLED_ON_CPU)
        for key, value in self.options.extra_config.items():
            so.add_session_config_entry(key, value)
        return so

    def inputs(self) -> list[IOSpec]:
        return list(self._inputs)

    def outputs(self) -> list[IOSpec]:
        return list(self._outputs)

    def allocate(self, dtype: np.dtype, capacity: int, *, on_host: bool = False) -> Buffer:
        if on_host or self.device == "cpu":
            return super().allocate(dtype, capacity, on_host=True)
        return OrtDeviceBuffer(dtype, capacity, self.device_id)

    def new_binding(self) -> OrtBinding | OrtValueBinding:
        if self._batched:
            return OrtValueBinding(self.session)
        return OrtBinding(self.session.io_binding())

    def run(
        self,
        binding: StepBinding,
        feeds: Mapping[str, Feed],
        outputs: Mapping[str, TensorView],
        kv: KVStep | None = None,
    ) -> None:
        try:
            if isinstance(binding, OrtValueBinding):
                binding.run(feeds, outputs, kv)
            else:
                assert isinstance(binding, OrtBinding)
                binding.run(self.session, feeds, outputs, kv, self.device_id)
        except Exception as exc:
            raise InferenceError(
                f"ONNX Runtime failed to run a step ({_first_line(exc)}); the request's shapes "
                "may exceed what the graph supports"
            ) from None
        self.after_run()

    def after_run(self) -> None:
        """A run of the session has ended: the first one starts the huge-page move (see
        runtime/huge_pages.py). Callers that run `self.session` themselves call it too."""
        if self._collapse_waiting:
            self._collapse_waiting = False
            self._collapse.begin()

    def output_pointers(self, binding: StepBinding) -> dict[str, int]:
        """Where the last run's outputs actually live (to check they are the bound buffers)."""
        assert isinstance(binding, OrtBinding | OrtValueBinding)
        return binding.output_pointers()

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "device": self.device,
            "providers": self.session.get_providers(),
            "threads": self.options.threads or available_cores(),
            "denormals_as_zero": self.options.denormals_as_zero,
            "optimization": self.options.optimization,
            "huge_page_mib": self.huge_page_bytes >> 20,
            "multilora": (
                f"cpu kernel ({self.multilora_library})"
                if self.multilora_library
                else "onnx function body"
            ),
        }


def _with_accuracy_level(graph: Path, level: int) -> bytes:
    """The graph with every MatMulNBits node set to `level` (serialized, for the session)."""
    try:
        import onnx
    except ImportError:
        raise InferenceError(
            "changing a MatMulNBits bundle's accuracy level needs the onnx package; "
            "pip install onnx, or load it with quant_accuracy=None"
        ) from None
    model = load_graph(graph)  # with its .data: the rewritten graph is handed over whole
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    try:
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - protobuf's over-2-GB error type varies by backend
        raise InferenceError(
            f"{graph}: a graph over 2 GB keeps the accuracy level it was exported with; "
            "re-export with --quant-accuracy, or load it with quant_accuracy=None"
        ) from None


def _device(view: TensorView) -> str:
    return "cpu" if view.on_host else "cuda"


def _spec(arg: object) -> IOSpec:
    dtype = ORT_TYPES.get(arg.type)
    if dtype is None:
        raise InferenceError(
            f"graph tensor {arg.name!r} has type {arg.type}, which the ORT backend does not "
            "handle; re-export with --precision fp32 or fp16"
        )
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return IOSpec(arg.name, np.dtype(dtype), shape)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
