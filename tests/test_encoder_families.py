"""Every encoder family and task, runtime mode with a LoRA adapter and its trained head,
against PyTorch/PEFT (<= 1e-4): one export per case, tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from encoder_tiny import SENTENCES, make_encoder_adapter, peft_outputs, save_tiny_encoder

from peft_export.exporter.encoders.export import export_encoder
from peft_export.runtime import load_bundle

TOL = 1e-4
CASES = [
    ("roberta", "sequence-classification"),
    ("xlm-roberta", "token-classification"),
    ("distilbert", "sequence-classification"),
    ("deberta-v2", "sequence-classification"),
    ("modernbert", "sequence-classification"),
    ("bert", "token-classification"),
    ("bert", "question-answering"),
    ("distilbert", "question-answering"),
    ("bert", "feature-extraction"),
]


def _export(tmp_path, arch, task, labels=None, **adapter_options):
    base = save_tiny_encoder(arch, task, tmp_path / "base")
    adapter = make_encoder_adapter(
        base,
        arch,
        task,
        tmp_path / "a",
        num_labels=len(labels) if labels else None,
        labels=labels,
        **adapter_options,
    )
    export_encoder(base, [("a", adapter)], out=tmp_path / "bundle", mode="runtime")
    return base, adapter, load_bundle(tmp_path / "bundle", threads=1)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_runtime_outputs_match_peft(tmp_path, arch, task):
    labels = ["O", "B-LOC", "I-LOC"] if "classification" in task else None
    base, adapter, bundle = _export(tmp_path, arch, task, labels)
    if task == "question-answering":
        encoded = bundle.encode(SENTENCES[:3], SENTENCES[3:])
    else:
        encoded = bundle.encode(SENTENCES)
    got = bundle.run(encoded, "a")
    ref = peft_outputs(base, arch, task, adapter, encoded, num_labels=len(labels or []) or None)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name][..., : value.shape[-1]], value, atol=TOL, rtol=0)
    base_rows = bundle.run(encoded, None)
    base_ref = peft_outputs(base, arch, task, None, encoded)
    for name, value in base_ref.items():
        np.testing.assert_allclose(base_rows[name][..., : value.shape[-1]], value, atol=TOL, rtol=0)
    if task == "token-classification":
        tags = bundle.tag(SENTENCES[:2], adapters="a")
        assert [t.token for t in tags[0]][:2] == ["the", "movie"]
        logits = ref["logits"][0]
        first = int(np.argmax(logits[1]))
        assert tags[0][0].label == labels[first]
    if task == "question-answering":
        answers = bundle.answer(SENTENCES[:3], SENTENCES[3:], adapters="a")
        for answer, context in zip(answers, SENTENCES[3:], strict=True):
            assert answer.text == context[answer.start : answer.end] and answer.text


def test_sentence_transformers_pooling_is_read_from_modules_json(tmp_path):
    base = save_tiny_encoder("bert", "feature-extraction", tmp_path / "base")
    (base / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    adapter = make_encoder_adapter(base, "bert", "feature-extraction", tmp_path / "a")
    manifest = export_encoder(base, [("a", adapter)], out=tmp_path / "m", mode="merged")
    assert manifest.encoder.pooling["mode"] == "cls" and manifest.encoder.pooling["normalize"]
    bundle = load_bundle(tmp_path / "m", threads=1)
    got = bundle.embed(SENTENCES, adapters="a")
    ref = peft_outputs(
        base,
        "bert",
        "feature-extraction",
        adapter,
        bundle.encode(SENTENCES),
        pooling="cls",
        normalize=True,
    )["embeddings"]
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
