"""Runtime mode for LN tuning: per-slot norm banks (bundle/norm_banks.py) mixed with LoRA rows.

Tiny Llama (RMSNorm, weight only) and tiny GPT-2 (LayerNorm with bias) runtime bundles are
exported with a LoRA adapter and norm banks, and take LN-tuning adapters at export (GPT-2) or
by `adapters add` (both). Each batch mixes LN-tuning, LoRA and base rows (one left-padded), prefill
then greedy decode through the KV cache, every row against PEFT's own unmerged forward of its
adapter (1e-4, greedy ids identical; tests/method_checks.py) and against the same row run
alone. Banks are filled by the runtime's adapter store, as served.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cli_run import run_cli
from method_checks import check_graph, greedy_run
from ort_graph import OrtGraph
from peft import PeftModel
from tiny import make_adapter, make_adapters, tiny_model

from peft_export.bundle import names
from peft_export.bundle import norm_banks as nb
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
from peft_export.exporter.runtime_adapters.norm_tuning import (
    add_ln_tuning_adapter,
    plan_norm_banks,
)
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.adapter_store import AdapterStore

PLANNERS = [plan_lora_banks, plan_norm_banks]
STEPS = 5
ALONE_TOL = 1e-5


def _export(arch: str, tmp, first_seed: int, *, exported: tuple[str, ...], **options):
    """Export `exported` of (lora, ln, ln2), then add the other LN-tuning adapters (the CLI
    adds the first, the API the second)."""
    base = tiny_model(arch)
    table = {"lora": ("lora", {}), "ln": ("ln_tuning", {}), "ln2": ("ln_tuning", {})}
    dirs = make_adapters(base, table, tmp, first_seed=first_seed)
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [(name, dirs[name]) for name in exported],
        out=out,
        mode="runtime",
        planners=PLANNERS,
        options={"slots": 4, **options},
    )
    added = [name for name in ("ln", "ln2") if name not in exported]
    assert run_cli("adapters", "add", str(out), f"{added[0]}={dirs[added[0]]}") == 0
    for name in added[1:]:
        add_ln_tuning_adapter(out, name, dirs[name])
    return base, dirs, out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """LoRA exported with norm banks on every norm (--norm-targets all); both LN-tuning
    adapters added later."""
    return _export(
        "llama", tmp_path_factory.mktemp("ln-llama"), 60, exported=("lora",), norm_targets="all"
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """LoRA and LN tuning exported together (the export's conversion path); ln2 added."""
    return _export("gpt2", tmp_path_factory.mktemp("ln-gpt2"), 70, exported=("lora", "ln"))


def _feeds(out, rows):
    store = AdapterStore(out, load_manifest(out))
    lease = store.acquire(rows)
    feeds = {key: value.numpy() for key, value in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    return feeds


def _references(base, dirs, rows):
    return [
        base if name is None else PeftModel.from_pretrained(copy.deepcopy(base), dirs[name]).eval()
        for name in rows
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_of_ln_tuning_lora_and_base_rows_matches_peft(request, arch):
    base, dirs, out = request.getfixturevalue(arch)
    manifest = load_manifest(out)
    assert manifest.adapters.installed["ln"].method == nb.METHOD
    assert manifest.adapters.installed["ln2"].method == nb.METHOD
    assert nb.METHOD in manifest.adapters.methods
    banks = [t.name for t in manifest.graph.inputs if nb.split_bank_input(t.name)]
    parts = {nb.split_bank_input(name)[1] for name in banks}
    assert parts == ({"weight", "bias"} if arch == "gpt2" else {"weight"})
    rows = ["ln", "lora", None, "ln2"]
    prompts = np.random.default_rng(5).integers(4, 250, size=(len(rows), 6))
    graph = OrtGraph(out, _feeds(out, rows))
    references = _references(base, dirs, rows)
    check_graph(graph, references, prompts, STEPS, names=[str(r) for r in rows], pad=2)


def test_each_row_of_a_mixed_batch_equals_the_row_alone(llama):
    _, _, out = llama
    rows = ["ln", "lora", None, "ln2"]
    prompts = np.random.default_rng(6).integers(4, 250, size=(len(rows), 5))
    batch_logits, batch_tokens = greedy_run(OrtGraph(out, _feeds(out, rows)), prompts, 3)
    for row, name in enumerate(rows):
        graph = OrtGraph(out, _feeds(out, [name]))
        logits, tokens = greedy_run(graph, prompts[row : row + 1], 3)
        assert np.abs(logits[0] - batch_logits[row]).max() <= ALONE_TOL, name
        np.testing.assert_array_equal(tokens[0], batch_tokens[row])


def test_adding_ln_tuning_to_a_bundle_without_norm_banks_is_refused(tmp_path, llama):
    base, dirs, _ = llama
    out = tmp_path / "lora-only"
    export_bundle(
        InMemoryBase(base),
        [("lora", dirs["lora"])],
        out=out,
        mode="runtime",
        planners=PLANNERS,
        options={"slots": 2},
    )
    before = sorted(p.name for p in (out / names.ADAPTERS_DIR).iterdir())
    with pytest.raises(ExportError) as info:
        add_ln_tuning_adapter(out, "ln", dirs["ln"])
    message = str(info.value)
    assert "has no norm banks for LN-tuning adapters" in message
    assert "--norm-targets all" in message and "\n" not in message
    assert sorted(p.name for p in (out / names.ADAPTERS_DIR).iterdir()) == before
    assert run_cli("adapters", "add", str(out), f"ln={dirs['ln']}") == 2


def test_onnx_runtime_adapter_file_is_refused_for_a_graph_with_norm_banks(llama):
    _, dirs, out = llama
    with pytest.raises(ExportError, match=r"also takes norm\..*drop --onnx-adapter"):
        add_adapter(out, "lora2", dirs["lora"], onnx_adapter=True)
    assert "lora2" not in load_manifest(out).adapters.installed


def test_cpp_runtime_refuses_norm_banks_at_the_first_step(llama):
    """The C++ runtime (runtime/cpp) feeds no norm banks: it refuses the bundle's graph input
    by name before running anything, and an LN-tuning adapter file as not fitting."""
    from test_cpp_runtime import CppRuntime, build_cpp

    _, _, out = llama
    runtime = CppRuntime(build_cpp(), out)
    try:
        with pytest.raises(RuntimeError, match=r"graph input 'norm\..*' is fed by nothing"):
            runtime.ids([[1, 17, 42]], ["lora"], max_new_tokens=2)
        with pytest.raises(RuntimeError, match=r"ln\.safetensors: tensor 'norm\."):
            runtime.ids([[1, 17, 42]], ["ln"], max_new_tokens=2)
    finally:
        runtime.close()


def test_ln_tuning_of_a_layer_that_is_no_norm_is_refused(tmp_path, llama):
    base, _, _ = llama
    adapter = make_adapter(base, "ln_tuning", tmp_path, target_modules=["q_proj"])
    with pytest.raises(ExportError, match="LN tuning of model.layers.0.self_attn.q_proj"):
        export_bundle(
            InMemoryBase(base),
            [("a", adapter)],
            out=tmp_path / "bundle",
            mode="runtime",
            planners=PLANNERS,
        )
    assert not (tmp_path / "bundle").exists()


def test_norm_banks_with_ort_fusions_are_refused(tmp_path, llama):
    """ONNX Runtime's norm fusion takes one weight per graph: it would fail at the first step."""
    base, dirs, _ = llama
    with pytest.raises(
        ExportError, match="not combined with --ort-fusions yet.*drop --ort-fusions"
    ):
        export_bundle(
            InMemoryBase(base),
            [("ln", dirs["ln"])],
            out=tmp_path / "bundle",
            mode="runtime",
            planners=PLANNERS,
            options={"ort_fusions": "cpu"},
        )
    assert not (tmp_path / "bundle").exists()
