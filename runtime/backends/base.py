"""The backend interface: a loader plus a runner, modelled on Polygraphy's backends.

A backend loads one graph (ONNX file or engine), describes its inputs and outputs, hands out
flat buffers on the host or on its device, and runs one step. A step takes named feeds that
are host numpy arrays (small per-step inputs: ids, mask, positions) or views of buffers it
allocated (KV cache, adapter banks), and writes every output into a bound view. Nothing in
the generation loop knows which backend it drives; heavy imports stay inside the backends.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle.manifest import Manifest

Dim = int | str
"""A fixed size, or the name of a dynamic dimension ("batch", "seq", "past", ...)."""


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output as the loaded graph declares it."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


class TensorView:
    """A contiguous prefix of a Buffer seen with a shape: what a step binds by pointer.

    A plain slotted class: a decode step creates a few hundred of these."""

    __slots__ = ("buffer", "shape", "dtype", "ptr", "on_host")

    def __init__(self, buffer: Buffer, shape: tuple[int, ...]) -> None:
        self.buffer = buffer
        self.shape = shape
        self.dtype = buffer.dtype
        self.ptr = buffer.ptr
        self.on_host = buffer.on_host

    def numpy(self) -> np.ndarray:
        """The view as a numpy array over the same memory (host buffers only)."""
        return self.buffer.host_array()[: math.prod(self.shape)].reshape(self.shape)


class Buffer(abc.ABC):
    """Flat memory owned by a backend; sized once, then re-viewed at every step."""

    def __init__(self, dtype: np.dtype, capacity: int, on_host: bool) -> None:
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self.on_host = on_host

    @property
    @abc.abstractmethod
    def ptr(self) -> int:
        """Address of the first element (stable for the buffer's life)."""

    def host_array(self) -> np.ndarray:
        """The flat numpy array of a host buffer (device buffers raise)."""
        raise TypeError("device buffers have no host array; bind a host buffer instead")

    def view(self, shape: tuple[int, ...]) -> TensorView:
        if math.prod(shape) > self.capacity:
            raise ValueError(f"view {shape} exceeds buffer capacity {self.capacity}")
        return TensorView(self, shape)


class HostBuffer(Buffer):
    """A buffer in ordinary host memory, backed by a numpy array (zeroed, or `array`)."""

    def __init__(self, dtype: np.dtype, capacity: int, array: np.ndarray | None = None) -> None:
        super().__init__(dtype, capacity, on_host=True)
        if array is None:
            array = np.zeros(max(capacity, 1), dtype=self.dtype)
        elif array.dtype != self.dtype or array.ndim != 1 or array.size < capacity:
            raise ValueError(
                f"array {array.dtype}{list(array.shape)} cannot back {capacity} x {dtype}"
            )
        self.array = array
        self._ptr = self.array.ctypes.data

    @property
    def ptr(self) -> int:
        return self._ptr

    def host_array(self) -> np.ndarray:
        return self.array


Feed = np.ndarray | TensorView


@dataclass(frozen=True)
class KVStep:
    """The KV cache of one step: each layer's past and present buffer, and their shapes.

    A decode step binds ~2 x layers KV tensors (120 for SmolLM2) whose shapes grow by one
    each step. Carrying them apart from the other feeds lets a backend bind them in one tight
    loop (ONNX Runtime: ~0.2 ms less Python per step) instead of one view object each."""

    past: tuple[tuple[str, Buffer], ...]
    present: tuple[tuple[str, Buffer], ...]
    past_shape: tuple[int, ...]
    present_shape: tuple[int, ...]

    def views(self) -> tuple[dict[str, TensorView], dict[str, TensorView]]:
        """The past as feeds and the present as outputs, for backends that bind views."""
        feeds = {name: TensorView(buf, self.past_shape) for name, buf in self.past}
        outputs = {name: TensorView(buf, self.present_shape) for name, buf in self.present}
        return feeds, outputs


class Backend(abc.ABC):
    """One loaded graph, ready to run steps. Instances are safe to share between threads as
    long as each thread runs with its own `StepBinding` (from `new_binding`)."""

    name: str = "backend"
    device: str = "cpu"
    retains_inputs: bool = False
    """True when inputs bound by a run stay bound for later runs on the same binding (ONNX
    Runtime's IOBinding): `run` may then omit feeds an earlier run on that binding passed."""

    @classmethod
    @abc.abstractmethod
    def from_bundle(cls, root: Path, manifest: Manifest, **options: Any) -> Backend:
        """Load this backend's artefact of a validated bundle (graph or engine).

        Unknown options raise InferenceError naming the accepted ones."""

    @abc.abstractmethod
    def inputs(self) -> list[IOSpec]:
        """Inputs of the loaded graph, in graph order."""

    @abc.abstractmethod
    def outputs(self) -> list[IOSpec]:
        """Outputs of the loaded graph, in graph order."""

    def allocate(self, dtype: np.dtype, capacity: int, *, on_host: bool = False) -> Buffer:
        """A flat buffer of `capacity` elements on the device (or on the host when asked)."""
        return HostBuffer(dtype, capacity)

    @abc.abstractmethod
    def new_binding(self) -> StepBinding:
        """Per-caller state for `run` (ORT: an IOBinding). Reuse it across steps."""

    @abc.abstractmethod
    def run(
        self,
        binding: StepBinding,
        feeds: Mapping[str, Feed],
        outputs: Mapping[str, TensorView],
        kv: KVStep | None = None,
    ) -> None:
        """Run one step: every graph input in `feeds` or `kv` (or, when `retains_inputs`,
        bound by an earlier run on `binding` with the same buffer), every graph output into
        `outputs` or `kv`."""

    def check_steps(self, steps: Sequence[Mapping[str, int]]) -> None:  # noqa: B027
        """Refuse, before any work, a request whose steps this backend cannot run.

        `steps` holds the named dimensions ("batch", "seq", "past", "prompt_len") of the
        request's extreme steps. Raise InferenceError naming the limit; ONNX Runtime takes any
        shape, a TensorRT engine only those of its profiles.
        """

    def describe(self) -> dict[str, object]:
        """A short, JSON-able summary (backend, device, providers, options) for logs."""
        return {"backend": self.name, "device": self.device}


class StepBinding:
    """Opaque per-caller run state; backends subclass it."""
