"""Runtime LoRA-family adapters: host copies, bank slots, per-row slot ids (numpy only).

The banks are allocated once (one buffer per `lora.*` graph input, [slots, ...], all cut from
one huge-page block: runtime/host_memory.py) and bound by pointer; placing an adapter writes
its slot in place, so a swap never re-creates a session or engine. Slot 0 is the base model
and is never written.

Concurrency: `acquire` pins every slot a request uses (a refcount per slot) for the whole
request and `release` unpins them (once per lease). A slot is written only under the lock,
while no one has it pinned and before any request can see it (the identity -> slot entry is
set after the write), so a running request never reads a half-written slot and an adapter in
use is never evicted. A request needing more adapters than free slots waits for other
requests to finish.

Slots are keyed by an adapter's identity, its name and the sha256 of its file's bytes, never
by the name alone: after `adapters add --replace`, a request that read the old file while the
new one was being read places the old copy under the old identity, so later requests (which
ask for the new identity) can never be handed the old weights. A slot whose identity is no
longer the name's current copy is freed as soon as no request pins it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.bundle import bottleneck, names, norm_banks, safetensors_io, token_inputs
from peft_export.bundle.errors import BundleError
from peft_export.bundle.lora_methods import LORA_METHODS, SCALE_PARTS
from peft_export.bundle.manifest import InstalledAdapter, Manifest, load_manifest
from peft_export.bundle.paths import confined
from peft_export.plugins.host_copy import region_copier
from peft_export.runtime import host_memory
from peft_export.runtime.backends.base import HostBuffer, TensorView
from peft_export.runtime.errors import InferenceError

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_FILE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
SLOT_METHODS = (
    *LORA_METHODS,
    *token_inputs.TOKEN_METHODS,
    bottleneck.METHOD,
    norm_banks.METHOD,
)
"""Methods whose adapters fill bank slots selected by adapter_ids: the LoRA family, trainable
tokens, bottleneck adapters and LN tuning."""
DEFAULT_WAIT_S = 60.0
COUNTERS = (
    "host_hits",
    "host_misses",
    "host_evictions",
    "slot_hits",
    "slot_misses",
    "slot_evictions",
)
"""Per tier: a hit found the adapter there, a miss brought it in (from the file into host
memory, or from host memory into a slot), an eviction pushed another adapter out."""


@dataclass(frozen=True)
class BankSpec:
    """One bank input: its name, the shape of one slot, and the slot-0 value."""

    name: str
    slot_shape: tuple[int, ...]
    fill: float
    integer: bool = False
    """An int64 bank (the token embedding index); the others hold the model dtype."""


@dataclass
class HostAdapter:
    """An adapter validated and held in host memory, ready to be written into a slot."""

    name: str
    method: str
    rank: int
    tensors: dict[str, np.ndarray]
    sha256: str = ""
    """sha256 of the file's bytes as read (checked against the manifest's record)."""
    regions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, repr=False, compare=False
    )
    """Cached (bank indices, source pointers, byte counts) for the native slot copy."""

    @property
    def identity(self) -> Identity:
        return (self.name, self.sha256)


Identity = tuple[str, str]
"""(adapter name, sha256 of its file): what a bank slot holds."""


@dataclass(frozen=True)
class Lease:
    """Slots pinned for one request: `ids[row]` is the row's slot (0 = base model)."""

    ids: np.ndarray
    slots: tuple[int, ...]
    token: object = field(default=None, repr=False, compare=False)
    """Identifies the lease to its store, so a second `release` of it unpins nothing."""


def bank_specs(manifest: Manifest) -> list[BankSpec]:
    """The bank inputs the graph declares (`lora.P.part`, `tokens.*`, `bottleneck.*` and
    `norm.*` of docs/bundle-format.md)."""
    specs = []
    for tensor in manifest.graph.inputs:
        split = names.split_lora_input(tensor.name)
        if split is None and (
            bottleneck.split_bank_input(tensor.name) is not None
            or norm_banks.split_bank_input(tensor.name) is not None
        ):
            split = (tensor.name, "A")  # slot 0 of bottleneck and norm banks is zeros
        if split is None and not token_inputs.is_token_bank(tensor.name):
            continue
        if not all(isinstance(d, int) for d in tensor.shape[1:]):
            raise InferenceError(
                f"bank input {tensor.name} has a dynamic inner shape {tensor.shape}; re-export"
            )
        fill = 0.0 if split is None or split[1] in ("A", "B") else 1.0
        integer = tensor.name in token_inputs.INT_BANKS
        shape = tuple(int(d) for d in tensor.shape[1:])
        specs.append(BankSpec(tensor.name, shape, fill, integer))
    return specs


def read_adapter_file(
    root: Path, manifest: Manifest, name: str, dtype: np.dtype, specs: dict[str, BankSpec]
) -> HostAdapter:
    """Read `adapters/NAME.safetensors`, refusing anything that does not fit the banks."""
    entry = manifest.adapters.installed.get(name)
    if entry is None or entry.method not in SLOT_METHODS:
        have = ", ".join(sorted(manifest.adapters.installed)) or "none"
        raise InferenceError(
            f"unknown LoRA-family adapter {name!r} (installed: {have}); add it with "
            f"'peft-export adapters add {root} {name}=PATH'"
        )
    try:
        path = confined(root, entry.file)
        with safetensors_io.SafetensorsReader(path) as reader:
            header = reader.header
            check_adapter_header(path, header, manifest, name, dtype, specs)
            tensors, digest = reader.read_all(allocate=host_memory.huge_page_bytes)
        safetensors_io.check_finite(path, tensors)
        _check_indices(path, tensors, specs)
        if entry.sha256 and digest != entry.sha256:
            raise BundleError(
                f"{path}: the file changed under the bundle (its sha256 is not the one the "
                f"manifest records); re-add the adapter with 'peft-export adapters add {root} "
                f"{name}=PATH --replace'"
            )
    except BundleError as exc:
        raise InferenceError(str(exc)) from None
    meta = header.metadata
    rank = int(meta.get("rank", "0") or 0)
    return HostAdapter(name, meta["method"], rank, tensors, digest)


def check_adapter_header(path, header, manifest, name, dtype, specs) -> None:
    """Refuse (BundleError) an adapter file whose header does not fit this bundle's banks."""
    meta = header.metadata
    if meta.get("format") != names.ADAPTER_FILE_FORMAT or meta.get("version") != "1":
        raise BundleError(f"{path}: not a peft-export adapter file (v1); re-add the adapter")
    if meta.get("base_weights_sha256") != manifest.base_model.weights_sha256:
        raise BundleError(
            f"{path}: adapter {name!r} was converted for another base model "
            "(base_weights_sha256 differs); re-add it with 'peft-export adapters add'"
        )
    if not meta.get("rank", "0").isdigit():
        raise BundleError(f"{path}: metadata rank {meta['rank']!r:.20} is not a count; re-add it")
    method = meta.get("method")
    if method not in SLOT_METHODS:
        raise BundleError(
            f"{path}: adapter method {method!r} is not a LoRA-family method; re-add the adapter "
            "with 'peft-export adapters add'"
        )
    # The gate is on the graph's inputs, not on the methods named in the manifest: an rsLoRA
    # file fills the same banks as a LoRA one (bundle/lora_methods.py).
    for key, info in header.tensors.items():
        spec = specs.get(key)
        if spec is None:
            split = names.split_lora_input(key)
            fix = (
                f"re-export with --methods including {method}"
                if split is not None and split[1] in SCALE_PARTS
                else "re-add the adapter, or re-export with --target-modules covering its modules"
            )
            raise BundleError(f"{path}: tensor {key!r} has no bank in this bundle; {fix}")
        want = _FILE_DTYPES[np.dtype(np.int64 if spec.integer else dtype)]
        if info.shape != spec.slot_shape or info.dtype != want:
            raise BundleError(
                f"{path}: tensor {key!r} is {info.dtype}{list(info.shape)}, the bank slot is "
                f"{want}{list(spec.slot_shape)}; re-add the adapter for this bundle"
            )


def _check_indices(path: Path, tensors: dict[str, np.ndarray], specs: dict[str, BankSpec]) -> None:
    """An embedding index must point at one of the slot's rows: the graph gathers by it."""
    rows = specs.get(token_inputs.EMBED_ROWS)
    index = tensors.get(token_inputs.EMBED_INDEX)
    if (
        index is not None
        and rows is not None
        and not ((index >= 0).all() and (index <= rows.slot_shape[0]).all())
    ):
        raise BundleError(
            f"{path}: {token_inputs.EMBED_INDEX} points outside the slot's "
            f"{rows.slot_shape[0]} embedding rows; re-add the adapter"
        )


def _check_bank_memory(slots: int, specs: Iterable[BankSpec], dtype: np.dtype) -> None:
    """Refuse banks larger than half this machine's memory (a huge `slots` in a manifest):
    filling them would take the machine down instead of failing."""
    need = slots * sum(
        math.prod(spec.slot_shape) * (8 if spec.integer else dtype.itemsize) for spec in specs
    )
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have // 2:
        raise InferenceError(
            f"{slots} adapter slots need {need / 2**30:.1f} GiB of banks, more than half of this "
            f"machine's {have / 2**30:.1f} GiB; load the bundle with fewer slots, or re-export "
            "it with a smaller --slots"
        )


def _mtime_ns(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


class AdapterStore:
    """Host copies of adapters plus the bank slots the graph reads; thread-safe."""

    def __init__(
        self,
        root: str | Path,
        manifest: Manifest,
        *,
        slots: int | None = None,
        wait_timeout_s: float = DEFAULT_WAIT_S,
        host_capacity: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.specs = {s.name: s for s in bank_specs(manifest)}
        if not self.specs:
            raise InferenceError(f"{self.root} has no LoRA banks; export it with --mode runtime")
        self.dtype = np.dtype(_NP_DTYPES.get(manifest.kv.dtype, np.float32))
        self.slots = int(slots or manifest.adapters.slots or 2)
        if self.slots < 2:
            raise InferenceError("an adapter store needs at least 2 slots (slot 0 is the base)")
        self.wait_timeout_s = wait_timeout_s
        self.host_capacity = host_capacity
        """Host copies kept (LRU) beyond those placed in slots; None keeps every one loaded."""
        _check_bank_memory(self.slots, self.specs.values(), self.dtype)
        self._views: dict[str, TensorView] = {}
        self._arrays: dict[str, np.ndarray] = {}
        shapes = [(self.slots, *spec.slot_shape) for spec in self.specs.values()]
        counts = [math.prod(shape) for shape in shapes]
        dtypes = [self._bank_dtype(spec) for spec in self.specs.values()]
        memory: list[np.ndarray] = [np.empty(0)] * len(counts)
        try:
            for group in dict.fromkeys(dtypes):
                picked = [i for i, d in enumerate(dtypes) if d == group]
                carved = host_memory.carve(group, [counts[i] for i in picked])
                for i, flat in zip(picked, carved, strict=True):
                    memory[i] = flat
        except (OSError, MemoryError):
            need = sum(c * d.itemsize for c, d in zip(counts, dtypes, strict=True))
            raise InferenceError(
                f"cannot allocate {need / 2**20:.0f} MiB of banks for {self.slots} adapter "
                "slots; free memory, or re-export the bundle with a smaller --slots"
            ) from None
        for spec, shape, count, flat, dtype in zip(
            self.specs.values(), shapes, counts, memory, dtypes, strict=True
        ):
            view = HostBuffer(dtype, count, flat).view(shape)
            array = view.numpy()
            array[...] = spec.fill
            self._views[spec.name] = view
            self._arrays[spec.name] = array
        self._copy_regions = region_copier()
        self._slot_pointers: dict[int, np.ndarray] = {}
        self._lock = threading.Condition()
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._slot_of: dict[Identity, int] = {}
        self._held_in: list[Identity | None] = [None] * self.slots
        self._pins = [0] * self.slots
        self._leases: set[object] = set()
        self._lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, self.slots))
        self.swaps = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        """Hits, misses and evictions of the host tier and of the slot tier (see COUNTERS)."""
        self._manifest_stamp = _mtime_ns(self.root / names.MANIFEST)

    # -- host memory ------------------------------------------------------------------

    def load(self, name: str) -> HostAdapter:
        """Bring an adapter into host memory (validated); no slot is touched.

        An adapter replaced in the bundle since it was loaded (`adapters add --replace`) is
        read again; its old slot is freed once no running request pins it. A copy read while
        a newer one replaced it is returned to its caller only, never kept.
        """
        adapter, hit = self._load(name)
        with self._lock:
            self.counters["host_hits" if hit else "host_misses"] += 1
        return adapter

    def _load(self, name: str) -> tuple[HostAdapter, bool]:
        """`load`, saying whether the host copy was there already (a host-tier hit)."""
        manifest = self._current_manifest()
        entry = manifest.adapters.installed.get(name)
        with self._lock:
            held = self._host.get(name)
            if held is not None and (entry is None or entry.sha256 in ("", held.sha256)):
                self._host.move_to_end(name)
                return held, True
        return self._read_new(manifest, name), False

    def _read_new(self, manifest: Manifest, name: str) -> HostAdapter:
        adapter = self._read(manifest, name)
        self._regions(adapter)  # ready for a native slot copy before anyone can place it
        with self._lock:
            held = self._host.get(name)
            if held is not None and held.sha256 == adapter.sha256:
                return held
            current = self.manifest.adapters.installed.get(name)
            if current is not None and current.sha256 not in ("", adapter.sha256):
                return adapter
            self._host[name] = adapter
            self._free_stale_locked(name)
            self._trim_host_locked()
            return adapter

    def _trim_host_locked(self) -> None:
        """Drop least recently used host copies beyond `host_capacity`; copies placed in a
        slot stay (the slot tier is kept inside the host tier), so this may stop short."""
        if self.host_capacity is None:
            return
        excess = len(self._host) - self.host_capacity
        if excess <= 0:
            return
        placed = {key[0] for key in self._slot_of}
        for name in [n for n in self._host if n not in placed][:excess]:
            del self._host[name]
            self.counters["host_evictions"] += 1

    def _read(self, manifest: Manifest, name: str) -> HostAdapter:
        """Read `name` with `manifest`; a failure while the bundle was being replaced is
        retried once with the manifest that replaced it."""
        try:
            return read_adapter_file(self.root, manifest, name, self.dtype, self.specs)
        except InferenceError:
            fresh = self._refresh_manifest()
            if fresh.adapters.installed.get(name) == manifest.adapters.installed.get(name):
                raise
        return read_adapter_file(self.root, fresh, name, self.dtype, self.specs)

    def drop(self, name: str) -> bool:
        """Forget an adapter (host copy and slots); False while a request is using it."""
        with self._lock:
            placed = [key for key in self._slot_of if key[0] == name]
            if any(self._pins[self._slot_of[key]] for key in placed):
                return False
            for key in placed:
                self._free_locked(key)
            self._host.pop(name, None)
            return True

    def held(self) -> list[str]:
        """Adapters in host memory (for multiplexing: which requests this replica serves)."""
        with self._lock:
            return sorted(self._host)

    def resident(self) -> dict[str, int]:
        """Adapters whose current copy is placed in a bank slot, with their slot."""
        with self._lock:
            return {key[0]: slot for key, slot in self._slot_of.items() if self._current(key)}

    def current_manifest(self) -> Manifest:
        """The bundle's manifest, re-read when `adapters add` (or a registry) changed it."""
        return self._current_manifest()

    def owns(self, name: str) -> bool:
        entry = self._current_manifest().adapters.installed.get(name)
        return entry is not None and entry.method in SLOT_METHODS

    def entry(self, name: str) -> InstalledAdapter | None:
        """The manifest's record of `name` (vocabulary, aLoRA invocation tokens)."""
        return self._current_manifest().adapters.installed.get(name)

    def _bank_dtype(self, spec: BankSpec) -> np.dtype:
        return np.dtype(np.int64) if spec.integer else self.dtype

    # -- slots ------------------------------------------------------------------------

    def acquire(self, adapters: Sequence[str | None]) -> Lease:
        """Pin a slot for every named adapter (placing it if needed); None rows get slot 0."""
        lease = self._acquire(adapters, wait=True)
        assert lease is not None
        return lease

    def try_acquire(self, adapters: Sequence[str | None]) -> Lease | None:
        """`acquire` that never waits: None when the slots it needs are pinned by others now
        (a scheduler keeps the request queued and tries again after a row leaves)."""
        return self._acquire(adapters, wait=False)

    def _acquire(self, adapters: Sequence[str | None], *, wait: bool) -> Lease | None:
        wanted = list(dict.fromkeys(a for a in adapters if a is not None))
        if len(wanted) > self.slots - 1:
            raise InferenceError(
                f"one request names {len(wanted)} different adapters but the banks hold "
                f"{self.slots - 1}; split the batch or load the bundle with more slots"
            )
        if not wait and not self._may_place(wanted):
            return None
        loaded = [self._load(name) for name in wanted]
        from_host = {adapter.name: hit for adapter, hit in loaded}
        hosted = [adapter for adapter, _ in loaded]
        keys = [adapter.identity for adapter in hosted]
        deadline = time.monotonic() + self.wait_timeout_s
        with self._lock:
            while not self._can_place(keys):
                if not wait:
                    return None
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise InferenceError(
                        "all adapter slots stayed in use by other requests; retry, or load "
                        "the bundle with more slots"
                    )
            slot_of = {}
            for adapter in sorted(hosted, key=lambda a: a.identity not in self._slot_of):
                if adapter.identity in self._slot_of:
                    self.counters["slot_hits"] += 1
                else:  # the host tier is consulted on a slot miss only
                    self.counters["slot_misses"] += 1
                    hit = from_host[adapter.name]
                    self.counters["host_hits" if hit else "host_misses"] += 1
                slot = self._place(adapter)
                self._pins[slot] += 1
                self._lru.move_to_end(slot)
                slot_of[adapter.name] = slot
            token = object()
            self._leases.add(token)
        ids = np.array([0 if a is None else slot_of[a] for a in adapters], dtype=np.int64)
        return Lease(ids, tuple(slot_of.values()), token)

    def _may_place(self, wanted: list[str]) -> bool:
        """Whether slots for `wanted` are free now, judged by the manifest's file hashes
        (so a request that must wait reads no file); True when a hash is not recorded."""
        installed = self._current_manifest().adapters.installed
        keys = [(name, getattr(installed.get(name), "sha256", "")) for name in wanted]
        if any(not digest for _, digest in keys):
            return True
        with self._lock:
            return self._can_place(keys)

    def release(self, lease: Lease) -> None:
        """Unpin the lease's slots; releasing it again (or a lease of another store) is a
        no-op, so pin counts never go negative."""
        with self._lock:
            if lease.token not in self._leases:
                return
            self._leases.discard(lease.token)
            for slot in lease.slots:
                self._pins[slot] -= 1
                key = self._held_in[slot]
                if not self._pins[slot] and key is not None and not self._current(key):
                    self._free_locked(key)
            self._lock.notify_all()

    def pinned(self) -> int:
        """Slots pinned by at least one lease now (0 when no request holds any)."""
        with self._lock:
            return sum(1 for pins in self._pins if pins)

    def stats(self) -> dict[str, int]:
        """The counters plus current sizes: host copies, placed slots, pinned slots."""
        with self._lock:
            return {
                **self.counters,
                "host_size": len(self._host),
                "slot_size": len(self._slot_of),
                "slots_pinned": sum(1 for pins in self._pins if pins),
            }

    def feeds(self) -> dict[str, TensorView]:
        """The bank buffers, bound by pointer (stable for the store's life)."""
        return dict(self._views)

    def bank(self, name: str) -> np.ndarray:
        """Host view of one bank (tests, diagnostics)."""
        return self._arrays[name]

    def write_slot(self, slot: int, adapter: HostAdapter) -> None:
        """Write `adapter` into bank slot `slot` now (benchmarks, tests): under the lock, and
        refused for slot 0 and for a slot a running request pins."""
        with self._lock:
            if not 0 < slot < self.slots or self._pins[slot]:
                raise InferenceError(
                    f"bank slot {slot} is the base model, out of range or in use by a request; "
                    f"write one of the unpinned slots 1..{self.slots - 1}"
                )
            self._assign_locked(slot, adapter)

    def _can_place(self, wanted: list[Identity]) -> bool:
        missing = sum(1 for key in wanted if key not in self._slot_of)
        free = sum(
            1 for s in range(1, self.slots) if not self._pins[s] and self._held_in[s] not in wanted
        )
        return missing <= free

    def _current(self, key: Identity) -> bool:
        """Whether `key` is the name's current host copy (else its slot serves no new request)."""
        held = self._host.get(key[0])
        return held is not None and held.sha256 == key[1]

    def _free_locked(self, key: Identity) -> None:
        """Forget the slot of `key` (unpinned) and make it the first to be reused."""
        slot = self._slot_of.pop(key)
        self._held_in[slot] = None
        self._lru.move_to_end(slot, last=False)

    def _free_stale_locked(self, name: str) -> None:
        """Free the unpinned slots holding an older copy of `name` (pinned ones: on release)."""
        for key, slot in list(self._slot_of.items()):
            if key[0] == name and not self._pins[slot] and not self._current(key):
                self._free_locked(key)

    def _place(self, adapter: HostAdapter) -> int:
        """Slot of `adapter`'s identity, writing it into the least recently used unpinned slot
        if needed. Called with the lock held; the chosen slot is pinned by no one."""
        slot = self._slot_of.get(adapter.identity)
        if slot is not None:
            return slot
        unpinned = [s for s in self._lru if not self._pins[s]]
        slot = next((s for s in unpinned if self._held_in[s] is None), unpinned[0])
        if self._held_in[slot] is not None:
            self.counters["slot_evictions"] += 1
        self._assign_locked(slot, adapter)
        self.swaps += 1
        return slot

    def _assign_locked(self, slot: int, adapter: HostAdapter) -> None:
        """Write `adapter` into unpinned `slot` and record it there (lock held). The slot is
        unnamed while it is written, so a failed write leaves it empty, never mislabelled."""
        evicted = self._held_in[slot]
        if evicted is not None:
            del self._slot_of[evicted]
        self._held_in[slot] = None
        moved = self._slot_of.pop(adapter.identity, None)
        if moved is not None:
            self._held_in[moved] = None
        self._write_slot_locked(slot, adapter)
        self._held_in[slot] = adapter.identity
        self._slot_of[adapter.identity] = slot

    def _write_slot_locked(self, slot: int, adapter: HostAdapter) -> None:
        """Copy one adapter into bank slot `slot` in place (slot-0 values where it has none).

        With the MultiLoRA CPU library built, all banks are copied in one native call
        (plugins/host_copy.py); numpy's per-bank copies take about half as long again."""
        if len(adapter.tensors) < len(self._arrays):
            for name, array in self._arrays.items():
                if name not in adapter.tensors:
                    array[slot].fill(self.specs[name].fill)
        regions = self._regions(adapter)
        if regions is None:
            for name, array in self._arrays.items():
                if name in adapter.tensors:
                    np.copyto(array[slot], adapter.tensors[name])
            return
        banks, sources, sizes = regions
        self._copy_regions(self._destinations(slot)[banks], sources, sizes)

    def _regions(self, adapter: HostAdapter) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(bank indices, source pointers, byte counts) for the native copy, cached on the
        adapter; None without the library or for tensors that are not slot-shaped arrays."""
        if self._copy_regions is None:
            return None
        if adapter.regions is None:
            picked = [
                (index, adapter.tensors[name], bank)
                for index, (name, bank) in enumerate(self._arrays.items())
                if name in adapter.tensors
            ]
            if not all(
                t.dtype == bank.dtype and t.flags.c_contiguous and t.shape == bank.shape[1:]
                for _, t, bank in picked
            ):
                return None
            adapter.regions = (
                np.array([i for i, _, _ in picked], dtype=np.intp),
                np.array([t.ctypes.data for _, t, _ in picked], dtype=np.uintp),
                np.array([t.nbytes for _, t, _ in picked], dtype=np.uintp),
            )
        return adapter.regions

    def _destinations(self, slot: int) -> np.ndarray:
        """Address of `slot` in every bank, in bank order (cached; the banks never move)."""
        pointers = self._slot_pointers.get(slot)
        if pointers is None:
            pointers = np.array([a[slot].ctypes.data for a in self._arrays.values()], np.uintp)
            self._slot_pointers[slot] = pointers
        return pointers

    def _current_manifest(self) -> Manifest:
        """The manifest, re-read only when its file changed (a stat per call)."""
        if _mtime_ns(self.root / names.MANIFEST) != self._manifest_stamp:
            self._refresh_manifest()
        return self.manifest

    def _refresh_manifest(self) -> Manifest:
        """Pick up adapters added to the bundle since it was loaded (same base, same banks)."""
        stamp = _mtime_ns(self.root / names.MANIFEST)
        try:
            fresh = load_manifest(self.root)
        except BundleError:
            return self.manifest
        self._manifest_stamp = stamp
        same_base = fresh.base_model.weights_sha256 == self.manifest.base_model.weights_sha256
        if same_base and {s.name for s in bank_specs(fresh)} == set(self.specs):
            self.manifest = fresh
        return self.manifest
