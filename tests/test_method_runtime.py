"""Runtime mode for the registry's factored methods (VeRA, OFT, ...: bundle/methods.py).

One tiny Llama runtime bundle (banks of rank 64, the full rank of its layers) is exported
with a LoRA and an OFT adapter (the export's conversion path) and takes every other factored
method by `adapters add` (the add path, base weights read back from the bundle). Each test
runs one mixed batch, a few of these methods plus a LoRA row and a base row, prefill then
greedy decode through the KV cache, every row against PEFT's own unmerged forward of its
adapter (1e-4, greedy ids identical; tests/method_checks.py).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from method_checks import check_graph
from ort_graph import OrtGraph
from peft import PeftModel
from tiny import MERGEABLE_METHODS, make_adapters, tiny_model

from peft_export.bundle import methods, names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.adapter_source import read_adapter
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter, read_base_targets
from peft_export.exporter.runtime_adapters.convert import convert_adapter
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.adapter_store import AdapterStore

FACTORED = [m for m in methods.runtime_names(methods.BANKS_FACTORED) if m not in MERGEABLE_METHODS]
"""LoHa and LoKr, factored too, run in test_runtime_lora_parity."""
EXPORTED = "oft"
R_MAX = 64
SLOTS = 8
GROUP = SLOTS - 2
"""Methods per batch: the other rows are a LoRA adapter and the base (slot 0)."""
GROUPS = [FACTORED[i : i + GROUP] for i in range(0, len(FACTORED), GROUP)]
STEPS = 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("runtime-methods")
    table = {"lora": ("lora", {}), **{m: (m, {}) for m in FACTORED}}
    dirs = make_adapters(base, table, tmp, first_seed=40)
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [("lora", dirs["lora"]), (EXPORTED, dirs[EXPORTED])],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
        options={"max_rank": R_MAX, "slots": SLOTS},
    )
    for name in FACTORED:
        if name != EXPORTED:
            add_adapter(out, name, dirs[name])
    return base, dirs, out


@pytest.mark.parametrize("group", GROUPS, ids=["-".join(g) for g in GROUPS])
def test_mixed_batch_with_lora_rows_matches_peft(bundle, group):
    base, dirs, out = bundle
    manifest = load_manifest(out)
    rows = [*group, "lora", None]
    for name in group:
        assert manifest.adapters.installed[name].method == name
    store = AdapterStore(out, manifest)
    lease = store.acquire(rows)
    feeds = {key: value.numpy() for key, value in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    references = [
        base if name is None else PeftModel.from_pretrained(copy.deepcopy(base), dirs[name]).eval()
        for name in rows
    ]
    prompts = np.random.default_rng(len(group)).integers(4, 250, size=(len(rows), 6))
    check_graph(OrtGraph(out, feeds), references, prompts, STEPS, names=[str(n) for n in rows])
    store.release(lease)


def test_rank_above_the_banks_is_refused_naming_the_rank(bundle):
    """VeRA r=8 has rank 8, OFT's rotation makes W' - W full rank (64)."""
    base, dirs, out = bundle
    manifest = load_manifest(out)
    small = dataclasses.replace(manifest.adapters, r_max=4)
    weights = read_base_targets(out, manifest)
    for method, rank in (("vera", 8), ("oft", 64)):
        source = read_adapter(dirs[method], name=method)
        with pytest.raises(ExportError) as info:
            convert_adapter(source, small, conv1d=False, base_weights=weights)
        message = str(info.value)
        assert f"has rank {rank} (as {method})" in message
        assert f"re-export with --max-rank {rank} or more" in message
        assert "\n" not in message


def test_delta_that_reads_the_base_needs_its_weights(bundle):
    _, dirs, out = bundle
    source = read_adapter(dirs["hra"], name="hra")
    with pytest.raises(
        ExportError,
        match="HRA, whose delta depends on the base weights.*"
        "re-export with --methods including hra",
    ):
        convert_adapter(source, load_manifest(out).adapters, conv1d=False, base_weights=None)
