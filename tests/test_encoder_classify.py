"""Encoder sequence classification: LoRA/DoRA/IA3 adapters with their own trained heads and
label counts, merged and as runtime inputs, against PyTorch/PEFT; mixed batches row by row."""

from __future__ import annotations

import json

import numpy as np
import pytest
from encoder_tiny import SENTENCES, make_encoder_adapter, peft_outputs, save_tiny_encoder

from peft_export.exporter.encoders.export import export_encoder
from peft_export.exporter.errors import ExportError
from peft_export.runtime import InferenceError, load_bundle

TASK = "sequence-classification"
TOL = 1e-4
ADAPTERS = {
    # name: (method, labels)
    "sentiment": ("lora", ["negative", "positive"]),
    "topic": ("dora", ["sport", "politics", "food", "film"]),
    "urgency": ("ia3", ["low", "mid", "high"]),
    "intent": ("prompt_tuning", ["ask", "tell", "order"]),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-cls")
    base = save_tiny_encoder("bert", TASK, root / "base")
    dirs = {}
    for seed, (name, (method, labels)) in enumerate(ADAPTERS.items(), start=1):
        targets = ["key", "value", "output.dense"] if method == "ia3" else ["query", "value"]
        extra = {"feedforward_modules": ["output.dense"]} if method == "ia3" else {}
        if method == "prompt_tuning":
            targets, extra = None, {"num_virtual_tokens": 3}
        dirs[name] = make_encoder_adapter(
            base,
            "bert",
            TASK,
            root / name,
            method=method,
            num_labels=len(labels),
            labels=labels,
            seed=seed,
            target_modules=targets,
            **extra,
        )
    runtime = export_encoder(base, list(dirs.items()), out=root / "runtime", mode="runtime")
    return {"root": root, "base": base, "dirs": dirs, "runtime": runtime}


@pytest.fixture(scope="module")
def bundle(work):
    return load_bundle(work["root"] / "runtime", threads=1)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_runtime_logits_match_peft(work, bundle, name):
    labels = ADAPTERS[name][1]
    encoded = bundle.encode(SENTENCES)
    got = bundle.run(encoded, name)["logits"]
    ref = peft_outputs(
        work["base"], "bert", TASK, work["dirs"][name], encoded, num_labels=len(labels)
    )["logits"]
    assert got.shape == (len(SENTENCES), 4)  # the largest head: topic's 4 labels
    np.testing.assert_allclose(got[:, : len(labels)], ref, atol=TOL, rtol=0)
    assert not np.any(got[:, len(labels) :]), "padded labels must stay zero"
    results = bundle.classify(SENTENCES, adapters=name)
    assert [r.label for r in results] == [labels[i] for i in ref.argmax(axis=1)]
    assert list(results[0].scores) == labels


def test_base_rows_use_the_base_head(work, bundle):
    encoded = bundle.encode(SENTENCES)
    got = bundle.run(encoded, None)["logits"]
    ref = peft_outputs(work["base"], "bert", TASK, None, encoded)["logits"]
    np.testing.assert_allclose(got[:, :2], ref, atol=TOL, rtol=0)
    assert bundle.labels(None) == ["LABEL_0", "LABEL_1"]


def test_mixed_batch_equals_each_row_alone(bundle):
    rows = ["sentiment", "topic", "intent", "urgency", None, "intent"]
    mixed = bundle.classify(SENTENCES, adapters=rows)
    for text, adapter, result in zip(SENTENCES, rows, mixed, strict=True):
        alone = bundle.classify([text], adapters=[adapter])[0]
        assert result.label == alone.label
        assert result.scores == pytest.approx(alone.scores, abs=1e-5)
        assert result.adapter == adapter
    assert len(mixed[1].scores) == 4 and len(mixed[0].scores) == 2


def test_more_adapters_than_slots_run_in_several_calls(work):
    bundle = load_bundle(work["root"] / "runtime", threads=1)
    bundle.slots.slots = 2  # one adapter per graph call: every row reloads its slot
    bundle.slots._resident.clear()
    rows = ["sentiment", "topic", "urgency", "topic"]
    small = bundle.classify(SENTENCES[:4], adapters=rows)
    full = load_bundle(work["root"] / "runtime", threads=1).classify(SENTENCES[:4], adapters=rows)
    for a, b in zip(small, full, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_labels_live_in_each_adapter_file(work):
    from safetensors import safe_open

    for name, (_, labels) in ADAPTERS.items():
        path = work["root"] / "runtime" / "adapters" / f"{name}.safetensors"
        with safe_open(str(path), "np") as f:
            assert json.loads(f.metadata()["labels"]) == labels


def test_merged_bundle_matches_peft(work, tmp_path):
    name = "topic"
    labels = ADAPTERS[name][1]
    export_encoder(work["base"], [(name, work["dirs"][name])], out=tmp_path / "m", mode="merged")
    merged = load_bundle(tmp_path / "m", threads=1)
    encoded = merged.encode(SENTENCES)
    got = merged.run(encoded, name)["logits"]
    ref = peft_outputs(
        work["base"], "bert", TASK, work["dirs"][name], encoded, num_labels=len(labels)
    )["logits"]
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert merged.labels(name) == labels
    assert merged.classify(SENTENCES[:1], adapters=name)[0].label in labels
    with pytest.raises(InferenceError, match="serves only"):
        merged.classify(SENTENCES[:1], adapters="sentiment")


def test_bad_requests_are_refused(bundle):
    with pytest.raises(InferenceError, match="no adapter 'nope'"):
        bundle.classify(["hi"], adapters="nope")
    with pytest.raises(InferenceError, match="one per row"):
        bundle.classify(["a", "b"], adapters=["sentiment"])
    with pytest.raises(InferenceError, match=r"call bundle.classify"):
        bundle.embed(["a"])


def test_prefix_tuning_is_refused_with_the_reason(work, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(work["base"])
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "prefix")
    with pytest.raises(ExportError, match="no past key values"):
        export_encoder(
            work["base"], [("p", tmp_path / "prefix")], out=tmp_path / "b", mode="runtime"
        )


def test_adapter_for_another_base_is_refused(work, tmp_path):
    other = save_tiny_encoder("bert", TASK, tmp_path / "other", hidden_size=48)
    adapter = make_encoder_adapter(other, "bert", TASK, tmp_path / "a", num_labels=2)
    with pytest.raises(ExportError, match="another base"):
        export_encoder(work["base"], [("a", adapter)], out=tmp_path / "b", mode="runtime")
