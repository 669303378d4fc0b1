"""`export --ort-fusions cpu` on encoders: ONNX Runtime's fused CPU ops, still equal to PEFT.

A tiny BERT classifier with two LoRA adapters on query/value, each with its own trained head
and label count. The merged bundle's layers become packed Attention + BiasGelu, their
residual adds stay Add + LayerNormalization (ONNX Runtime's SkipLayerNormalization is slower
on CPU); the runtime bundle keeps its LoRA banks (MultiLoRA nodes, a slot per row by
adapter_ids) and head banks feeding one MultiHeadAttention a layer, and a mixed batch of
padded rows still equals PEFT row by row (<= 1e-4).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from encoder_tiny import SENTENCES, make_encoder_adapter, peft_outputs, save_tiny_encoder

from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.encoders.export import export_encoder
from peft_export.runtime import load_bundle

TASK = "sequence-classification"
TOL = 1e-4
ADAPTERS = {"sentiment": ["negative", "positive"], "topic": ["sport", "politics", "food"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-fused")
    base = save_tiny_encoder("bert", TASK, root / "base")
    dirs = {
        name: make_encoder_adapter(
            base,
            "bert",
            TASK,
            root / name,
            num_labels=len(labels),
            labels=labels,
            seed=seed,
            target_modules=["query", "value"],
        )
        for seed, (name, labels) in enumerate(ADAPTERS.items(), start=1)
    }
    runtime = root / "runtime"
    options = {"ort_fusions": "cpu"}
    export_encoder(base, list(dirs.items()), out=runtime, mode="runtime", options=options)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    return {"root": root, "base": base, "dirs": dirs, "layers": layers, "runtime": runtime}


def _ops(bundle: Path) -> Counter:
    graph = onnx.load(str(bundle / names.GRAPH), load_external_data=False).graph
    return Counter(f"{node.domain}:{node.op_type}" for node in graph.node)


def _reference(work, adapter: str | None, encoded) -> np.ndarray:
    labels = ADAPTERS.get(adapter or "", [])
    path = work["dirs"][adapter] if adapter else None
    return peft_outputs(work["base"], "bert", TASK, path, encoded, num_labels=len(labels) or None)[
        "logits"
    ]


def test_merged_fused_graph_matches_peft(work, tmp_path):
    out = tmp_path / "merged"
    adapter = f"topic={work['dirs']['topic']}"
    argv = ["export", "--base", str(work["base"]), "--adapter", adapter, "--ort-fusions", "cpu"]
    assert run_cli(*argv, "--out", str(out)) == 0
    assert load_manifest(out).graph.ort_fusions == "cpu"
    ops, layers = _ops(out), work["layers"]
    assert ops["com.microsoft:Attention"] == layers, ops
    assert ops["com.microsoft:SkipLayerNormalization"] == 0, ops
    assert ops[":LayerNormalization"] == 2 * layers + 1, ops  # + the embeddings' norm
    assert ops["com.microsoft:BiasGelu"] == layers, ops
    bundle = load_bundle(out, threads=1)
    encoded = bundle.encode(SENTENCES)  # rows of different lengths: padding is masked
    got = bundle.run(encoded, "topic")["logits"]
    np.testing.assert_allclose(got, _reference(work, "topic", encoded), atol=TOL, rtol=0)


def test_runtime_fused_graph_keeps_adapters_exact_in_a_mixed_batch(work):
    out = work["runtime"]
    assert load_manifest(out).graph.ort_fusions == "cpu"
    ops, layers = _ops(out), work["layers"]
    assert ops["com.microsoft:SkipLayerNormalization"] == 0, ops
    assert ops["com.microsoft:BiasGelu"] == layers, ops
    lora = f"{names.MULTILORA_DOMAIN}:{names.MULTILORA_OP}"
    lora_nodes = sum(n for op, n in ops.items() if op.startswith(lora))
    assert lora_nodes == 2 * layers, ops  # query and value of every layer
    assert ops["com.microsoft:MultiHeadAttention"] == layers, ops
    assert ops[":Softmax"] == ops[":Split"] == 0, ops  # attention fused, projections unpacked
    bundle = load_bundle(out, threads=1)
    encoded = bundle.encode(SENTENCES)
    rows = ["sentiment", "topic", None, "topic", "sentiment", "topic"]
    got = bundle.run(encoded, rows)["logits"]
    for adapter in ("sentiment", "topic", None):
        ref = _reference(work, adapter, encoded)
        picked = [i for i, row in enumerate(rows) if row == adapter]
        width = ref.shape[1]
        np.testing.assert_allclose(got[picked, :width], ref[picked], atol=TOL, rtol=0)
        assert not np.any(got[picked, width:]), "padded labels must stay zero"
    alone = [
        bundle.run(bundle.encode([text]), [row])["logits"][0]
        for text, row in zip(SENTENCES, rows, strict=True)
    ]
    np.testing.assert_allclose(got, np.stack(alone), atol=1e-5, rtol=0)


def test_the_huge_page_move_begins_after_the_first_run(work):
    bundle = load_bundle(work["runtime"], threads=1)
    assert bundle.backend._collapse_waiting
    bundle.run(bundle.encode(SENTENCES), "topic")
    assert not bundle.backend._collapse_waiting
