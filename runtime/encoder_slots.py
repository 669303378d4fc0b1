"""Bank slots of an encoder runtime bundle: which adapter's deltas and head sit in which slot.

Every bank input (`lora.*` deltas, `bottleneck.*` adapter layers, `head.*` task heads) is one
host array [slots, ...]; slot 0 is the base model (zero deltas and bottleneck parts, unit
scales, the base's own head), and adapters are copied into slots 1.. on first use, the least
recently used one giving way when all are taken. The runtime feeds the arrays as they are,
with `adapter_ids` choosing each row's slot.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names, safetensors_io
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.runtime.errors import InferenceError

LABELS_METADATA = "labels"


class EncoderSlots:
    """Host banks and the adapter -> slot map of one loaded encoder bundle."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        layout = manifest.adapters
        self.slots = max(layout.slots, 1)
        self.banks: dict[str, np.ndarray] = {}
        for spec in manifest.graph.inputs:
            if spec.name in (names.INPUT_IDS, names.ATTENTION_MASK, names.ADAPTER_IDS):
                continue
            lora = names.split_lora_input(spec.name)
            head = names.split_head_input(spec.name)
            if lora is None and head is None and bn.split_bank_input(spec.name) is None:
                continue
            shape = tuple(self.slots if d == "slots" else d for d in spec.shape)
            if not all(isinstance(d, int) for d in shape):
                raise InferenceError(
                    f"bank input {spec.name} has a dynamic dim {spec.shape}; re-export the bundle"
                )
            bank = np.zeros(shape, dtype=np.float32)
            if lora is not None and lora[1] not in ("A", "B"):
                bank[0] = 1.0
            self.banks[spec.name] = bank
        self.base_slot = {k: v[0].copy() for k, v in self.banks.items()}
        heads = confined(root, names.adapter_file(names.ENCODER_HEADS))
        if heads.is_file():
            for key, value in _read(heads).items():
                if key in self.banks:
                    self._check_shape(key, value, heads)
                    self.base_slot[key] = value
                    self.banks[key][0] = value
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._labels: dict[str, list[str]] = {}
        self._prompts: dict[str, np.ndarray | None] = {}
        self.prompt_width = next(
            (int(t.shape[-1]) for t in manifest.graph.inputs if t.name == names.PROMPT_EMBEDS), 0
        )

    @property
    def capacity(self) -> int:
        """Distinct adapters one graph run can serve (slot 0 is the base)."""
        return self.slots - 1

    def labels(self, adapter: str) -> list[str]:
        """The adapter's labels in id order (from its file's header)."""
        if adapter not in self._labels:
            entry = self._entry(adapter)
            header = _header(confined(self.root, entry.file))
            raw = header.metadata.get(LABELS_METADATA)
            try:
                labels = json.loads(raw) if raw is not None else []
            except json.JSONDecodeError:
                labels = None
            if not isinstance(labels, list):
                raise InferenceError(
                    f"{entry.file}: its labels entry is not a JSON list; re-export the bundle"
                )
            self._labels[adapter] = [str(label) for label in labels]
        return self._labels[adapter]

    def prompt(self, adapter: str | None) -> np.ndarray | None:
        """The adapter's virtual token embeddings [n_virtual, hidden] (prompt tuning), or None."""
        if adapter is None or not self.prompt_width:
            return None
        if adapter not in self._prompts:
            path = confined(self.root, self._entry(adapter).file)
            value = _read(path).get(names.PROMPT_EMBEDS)
            if value is not None and (value.ndim != 2 or value.shape[1] != self.prompt_width):
                raise InferenceError(
                    f"{path}: prompt_embeds is {list(value.shape)}, the graph takes width "
                    f"{self.prompt_width}; re-export the bundle"
                )
            self._prompts[adapter] = value
        return self._prompts[adapter]

    def assign(self, adapters: Sequence[str | None]) -> np.ndarray:
        """Slot ids for rows using `adapters` (None: the base), loading adapters as needed."""
        wanted = list(dict.fromkeys(a for a in adapters if a is not None))
        if len(wanted) > self.capacity:
            raise InferenceError(
                f"one run can mix at most {self.capacity} adapters (the bundle's slots - 1), got "
                f"{len(wanted)}; split the batch or re-export with more --slots"
            )
        for name in wanted:
            self._entry(name)
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
        for name in wanted:
            if name not in self._resident:
                self._load(name, self._free_slot(set(wanted)))
        return np.array([0 if a is None else self._resident[a] for a in adapters], np.int64)

    def _entry(self, name: str):
        entry = self.manifest.adapters.installed.get(name)
        if entry is None:
            have = ", ".join(sorted(self.manifest.adapters.installed)) or "none"
            raise InferenceError(f"the bundle has no adapter {name!r} (installed: {have})")
        return entry

    def _free_slot(self, keep: set[str]) -> int:
        taken = set(self._resident.values())
        for slot in range(1, self.slots):
            if slot not in taken:
                return slot
        victim = next(name for name in self._resident if name not in keep)
        return self._resident.pop(victim)

    def _load(self, name: str, slot: int) -> None:
        path = confined(self.root, self._entry(name).file)
        tensors = _read(path)
        tensors.pop(names.PROMPT_EMBEDS, None)
        unknown = sorted(set(tensors) - set(self.banks))
        if unknown:
            raise InferenceError(
                f"{path}: tensor {unknown[0]} has no bank input in this graph; re-export the bundle"
            )
        for key, bank in self.banks.items():
            value = tensors.get(key)
            if value is None:
                bank[slot] = self.base_slot[key]
            else:
                self._check_shape(key, value, path)
                bank[slot] = value
        self._resident[name] = slot

    def _check_shape(self, key: str, value: np.ndarray, path: Path) -> None:
        if value.shape != self.banks[key].shape[1:]:
            raise InferenceError(
                f"{path}: {key} is {list(value.shape)} but the graph's bank slot is "
                f"{list(self.banks[key].shape[1:])}; re-export the bundle"
            )


def _header(path: Path) -> safetensors_io.SafetensorsHeader:
    try:
        return safetensors_io.read_header(path)
    except BundleError as exc:
        raise InferenceError(str(exc)) from None
    except FileNotFoundError:
        raise InferenceError(f"{path} is missing; re-export the bundle") from None


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors_io.read_tensors(path)
        safetensors_io.check_finite(path, tensors)
    except BundleError as exc:
        raise InferenceError(str(exc)) from None
    except FileNotFoundError:
        raise InferenceError(f"{path} is missing; re-export the bundle") from None
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
