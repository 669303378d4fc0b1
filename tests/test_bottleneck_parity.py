"""Bottleneck adapters (AdapterHub `adapters`) in runtime bundles vs the library's own forward.

The adapters are trained, saved and run by the library in its own venv (tests/adapters_venv.py,
tests/bottleneck_reference.py) on the same tiny Llama weights; the bundle serves them from
bottleneck banks, alone and in one batch with a PEFT LoRA row and a base-model row.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters_venv import run_in_venv
from cli_run import run_cli
from ort_graph import OrtGraph
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny import make_adapter, tiny_config, tiny_model

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.adapter_source import read_adapter
from peft_export.exporter.bottleneck.bundle_adapters import add_bottleneck_adapter
from peft_export.exporter.bottleneck.planner import plan_bottleneck_banks
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.adapter_store import AdapterStore
from peft_export.runtime.session import load_bundle

TOL = 1e-4
STEPS = 4
REFERENCE_SCRIPT = "bottleneck_reference.py"
ADAPTERS = {
    # Houlsby: after attention and after the feed-forward block, swish
    "houlsby": {"class": "DoubleSeqBnConfig", "kwargs": {}},
    # Pfeiffer: after the feed-forward block, reads h + r (original_ln_before), relu
    "pfeiffer": {"class": "SeqBnConfig", "kwargs": {}},
    # He et al.: parallel to the feed-forward block, reads r, scaling 4
    "parallel": {
        "class": "ParBnConfig",
        "kwargs": {"reduction_factor": 8, "non_linearity": "tanh"},
    },
    # residual from the adapter input, learned scalar scale, a left-out layer, per-layer widths
    "variant": {
        "class": "SeqBnConfig",
        "kwargs": {
            "residual_before_ln": False,
            "non_linearity": "gelu",
            "scaling": "learned",
            "leave_out": [1],
            "reduction_factor": {"0": 8, "default": 16},
        },
    },
    # AdapterPlus-like: no residual of its own after, per-channel scale, tanh-approximate gelu
    "plus": {
        "class": "SeqBnConfig",
        "kwargs": {
            "original_ln_after": False,
            "residual_before_ln": False,
            "scaling": "channel",
            "non_linearity": "gelu_new",
            "mh_adapter": True,
        },
    },
}
LATER = {
    # added to the bundle after export (adapters add): fits the banks, relu
    "late": {"class": "DoubleSeqBnConfig", "kwargs": {"non_linearity": "relu", "scaling": 2.0}},
    # only pickled weights: refused
    "pickled": {"class": "SeqBnConfig", "kwargs": {}, "safetensors": False},
}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny Llama base, and the library's adapters and references on it."""
    tmp = tmp_path_factory.mktemp("bottleneck")
    base = tiny_model("llama")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp / "base.safetensors")
    prompts = np.random.default_rng(3).integers(4, 250, size=(4, 7))
    job = {
        "base_config": {**tiny_config("llama").to_diff_dict(), "attn_implementation": "eager"},
        "base_weights": str(tmp / "base.safetensors"),
        "adapters": {
            name: {"safetensors": True, **spec, "seed": 100 + i}
            for i, (name, spec) in enumerate({**ADAPTERS, **LATER}.items())
        },
        "prompts": prompts.tolist(),
        "steps": STEPS,
        "out": str(tmp / "library"),
    }
    job["base_config"].pop("model_type", None)
    job["base_config"].pop("transformers_version", None)
    (tmp / "job.json").write_text(json.dumps(job))
    run_in_venv(Path(__file__).with_name(REFERENCE_SCRIPT), str(tmp / "job.json"))
    reference = dict(np.load(tmp / "library" / "reference.npz"))
    return base, prompts, reference, tmp


@pytest.fixture(scope="module")
def served(library):
    """Base, library adapters with references, a PEFT LoRA, and one runtime bundle of all."""
    base, prompts, reference, tmp = library
    lora = make_adapter(base, "lora", tmp, name="lora", seed=7)
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [("lora", lora), *((name, tmp / "library" / name) for name in ADAPTERS)],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks, plan_bottleneck_banks],
        # every graph activation, so the one-hot picks among all of them (and TensorRT parses all)
        options={"slots": 8, "methods": "lora", "bottleneck_activations": list(bn.ACTIVATIONS)},
    )
    return base, prompts, reference, lora, out, tmp


def _greedy(bundle, adapters, prompts, steps=STEPS):
    """Prefill logits, then each decode step's logits and the greedy tokens, via the KV cache."""
    store = AdapterStore(bundle, load_manifest(bundle))
    lease = store.acquire(adapters)
    feeds = {k: v.numpy() for k, v in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    graph = OrtGraph(bundle, feeds)
    graph.reset(batch=len(adapters))
    prefill = graph.step(prompts)
    logits, tokens, last = prefill, [], []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]
        tokens.append(token)
        logits = graph.step(token)
        last.append(logits[:, -1])
    store.release(lease)
    return prefill, np.stack(last, 1), np.concatenate(tokens, 1)


def _torch_greedy(model, prompts, steps=STEPS):
    """PEFT / base reference: greedy over the full sequence, no cache."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        logits = model(ids).logits
        prefill, last, tokens = logits.numpy(), [], []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            ids = torch.cat([ids, token], 1)
            logits = model(ids).logits
            last.append(logits[:, -1])
    return prefill, torch.stack(last, 1).numpy(), torch.cat(tokens, 1).numpy()


def _assert_rows_equal(got, want, label):
    prefill, steps, tokens = got
    assert np.array_equal(tokens, want[2]), f"{label}: greedy tokens differ"
    assert np.abs(prefill - want[0]).max() <= TOL, f"{label}: prefill logits"
    assert np.abs(steps - want[1]).max() <= TOL, f"{label}: decode logits"


def _library(reference, name, rows=slice(None)):
    return tuple(reference[f"{name}.{part}"][rows] for part in ("prefill", "steps", "tokens"))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_adapter_alone_equals_library_forward(served, name):
    base, prompts, reference, _, bundle, _ = served
    want = _library(reference, name)
    with torch.no_grad():
        plain = base(torch.tensor(prompts)).logits.numpy()
    change = np.abs(want[0] - plain).max()
    assert change > 100 * TOL, f"{name} barely changes the base ({change:.2e}): a weak test"
    got = _greedy(bundle, [name] * len(prompts), prompts)
    _assert_rows_equal(got, want, name)


def test_mixed_batch_with_lora_and_base_rows(served):
    base, prompts, reference, lora, bundle, _ = served
    rows = [None, "lora", *ADAPTERS]
    picks = [i % len(prompts) for i in range(len(rows))]
    got = _greedy(bundle, rows, prompts[picks])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), lora).eval()
    for row, (name, pick) in enumerate(zip(rows, picks, strict=True)):
        mine = tuple(part[row : row + 1] for part in got)
        if name is None:
            with peft_model.disable_adapter():
                want = _torch_greedy(peft_model, prompts[pick : pick + 1])
        elif name == "lora":
            want = _torch_greedy(peft_model, prompts[pick : pick + 1])
        else:
            want = _library(reference, name, slice(pick, pick + 1))
        _assert_rows_equal(mine, want, f"row {row} ({name})")


def test_slot_zero_holds_zeros_and_manifest_records_the_banks(served):
    _, _, _, _, bundle, _ = served
    manifest = load_manifest(bundle)
    layout = manifest.adapters.bottleneck
    assert layout is not None and bn.METHOD in manifest.adapters.methods
    assert layout.activations == list(bn.ACTIVATIONS)
    assert {(s.layer, s.location) for s in layout.sites} == {
        (layer, loc) for layer in (0, 1) for loc in bn.LOCATIONS
    }
    store = AdapterStore(bundle, manifest)
    bottleneck_banks = [n for n in store.specs if bn.split_bank_input(n)]
    assert len(bottleneck_banks) == len(layout.sites) * len(bn.PARTS)
    lease = store.acquire(list(ADAPTERS))
    for name in bottleneck_banks:
        assert not store.bank(name)[0].any(), name
    store.release(lease)


def test_adapter_added_after_export_equals_library_forward(served):
    """Through the CLI, as a user adds one: `peft-export adapters add BUNDLE late=FOLDER`."""
    _, prompts, reference, _, bundle, tmp = served
    assert run_cli("adapters", "add", str(bundle), f"late={tmp / 'library' / 'late'}") == 0
    installed = load_manifest(bundle).adapters.installed["late"]
    assert installed.method == bn.METHOD and installed.rank == 4
    got = _greedy(bundle, ["late", "houlsby"], prompts[:2])
    _assert_rows_equal(tuple(p[:1] for p in got), _library(reference, "late", slice(0, 1)), "late")
    want = _library(reference, "houlsby", slice(1, 2))
    _assert_rows_equal(tuple(p[1:] for p in got), want, "houlsby")


def test_adapter_that_does_not_fit_the_banks_is_refused(served, tmp_path):
    *_, bundle, tmp = served
    folder = shutil.copytree(tmp / "library" / "houlsby", tmp_path / "wide")
    weights = folder / "adapter.safetensors"
    tensors = load_file(weights)
    for key, value in tensors.items():
        if "adapter_down" in key:  # widen the bottleneck to 16 with zero rows
            tensors[key] = torch.cat([value, torch.zeros(16 - value.shape[0], *value.shape[1:])])
        elif key.endswith("adapter_up.weight"):
            tensors[key] = torch.cat([value, torch.zeros(value.shape[0], 16 - value.shape[1])], 1)
    save_file(tensors, weights)
    before = (bundle / names.MANIFEST).read_bytes()
    with pytest.raises(
        ExportError, match="width 16, the graph's banks hold 8.*--bottleneck-size 16"
    ):
        add_bottleneck_adapter(bundle, "wide", folder)
    assert (bundle / names.MANIFEST).read_bytes() == before
    assert not (bundle / names.adapter_file("wide")).exists()


def test_pickle_only_folder_is_refused_with_the_fix(served):
    *_, tmp = served
    with pytest.raises(ExportError, match=r"pytorch_adapter\.bin.*use_safetensors=True"):
        read_adapter(tmp / "library" / "pickled")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("use_gating", True, "use_gating"),
        ("phm_layer", True, "phm_layer"),
        ("ln_after", True, "ln_after"),
        ("non_linearity", "softsign", "non_linearity 'softsign' is not supported"),
        ("residual_before_ln", "post_add", "post_add"),
        ("scaling", "squared", "scaling 'squared' is unknown"),
    ],
)
def test_options_without_a_graph_form_are_refused(served, tmp_path, option, value, message):
    base, *_, tmp = served
    folder = shutil.copytree(tmp / "library" / "pfeiffer", tmp_path / "edited")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"][option] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=message):
        read_adapter(folder, base=base)


def test_adapter_for_another_base_is_refused(served):
    *_, tmp = served
    other = tiny_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ExportError, match="hidden_size 64, the base 32"):
        read_adapter(tmp / "library" / "houlsby", base=other)


def test_bundle_builds_with_tensorrt_rtx(served, tmp_path, monkeypatch):
    """Every bank, activation and mix op parses and builds (TensorRT-RTX ahead of time)."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed")
    from peft_export.exporter.engines.build import EngineOptions, build_engines

    *_, bundle, _ = served
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    options = EngineOptions(batch="1:2:4", seq="1:8:32", past="0:16:64", progress=False)
    record = build_engines(copy, load_manifest(copy), options)
    assert (copy / record.file).stat().st_size > 10_000


def test_runtime_generate_serves_bottleneck_and_lora_rows(served):
    """The runtime package's own generation loop (adapter store, KV buffers), one batch."""
    _, prompts, reference, _, bundle, _ = served
    loaded = load_bundle(bundle, threads=1)
    rows = ["pfeiffer", "lora", "houlsby", None]
    out = loaded.generate(
        [list(map(int, p)) for p in prompts], adapters=rows, max_new_tokens=STEPS, ignore_eos=True
    )
    got = np.array([list(ids) for ids in out.token_ids])
    alone = _greedy(bundle, rows, prompts)[2]
    assert np.array_equal(got, alone)
    for row in (0, 2):
        assert np.array_equal(got[row], reference[f"{rows[row]}.tokens"][row]), rows[row]


def test_bottleneck_only_bundle_with_every_site(library, tmp_path):
    """No LoRA banks at all: the bottleneck plan alone, banks on every site, 3 slots."""
    base, prompts, reference, tmp = library
    out = tmp_path / "bundle"
    manifest = export_bundle(
        InMemoryBase(base),
        [(name, tmp / "library" / name) for name in ("variant", "parallel")],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks, plan_bottleneck_banks],
        options={"bottleneck_sites": "all", "slots": 3},
    )
    assert manifest.adapters.methods == [bn.METHOD] and not manifest.adapters.modules
    assert len(manifest.adapters.bottleneck.sites) == 4
    rows = ["variant", "parallel"]
    got = _greedy(out, rows, prompts[:2])
    for row, name in enumerate(rows):
        want = _library(reference, name, slice(row, row + 1))
        _assert_rows_equal(tuple(p[row : row + 1] for p in got), want, name)
    generated = load_bundle(out, threads=1).generate(
        [list(map(int, p)) for p in prompts[:2]], adapters=rows, max_new_tokens=STEPS
    )
    assert np.array_equal(np.array(generated.token_ids), got[2])


def test_verify_names_bottleneck_adapters_it_cannot_reference(served):
    """verify has PEFT as its reference: a bottleneck adapter is left out of the targets (its
    rows join the mixed-batch check) and naming one is refused with the reason."""
    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.errors import ExportError
    from peft_export.exporter.verify import _targets, verify_bundle

    *_, out, _ = served
    name = next(iter(ADAPTERS))
    with pytest.raises(ExportError, match=f"adapter {name}: .*adapters library"):
        verify_bundle(out, adapters=[name])
    targets = _targets(out, load_manifest(out), None, {})
    assert [t.name for t in targets] == [None, "lora"]


def test_folder_with_a_saved_head_is_refused_by_a_decoder_bundle(served, tmp_path, capsys):
    """A head saved beside the adapter would be dropped silently by a decoder bundle."""
    import shutil

    from safetensors.torch import save_file as save_torch

    *_, out, tmp = served
    folder = tmp_path / "with-head"
    shutil.copytree(tmp / "library" / "late", folder)
    save_torch({"heads.default.0.weight": torch.zeros(4, 4)}, folder / "model_head.safetensors")
    before = (out / "manifest.json").read_bytes()
    assert run_cli("adapters", "add", str(out), f"headed={folder}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_head.safetensors" in err[0] and "with_head=False" in err[0]
    assert (out / "manifest.json").read_bytes() == before
