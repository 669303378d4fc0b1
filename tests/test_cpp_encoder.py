"""The C++ runtime on encoder bundles (peft_export_encode, peft-encode) against PyTorch/PEFT.

Tiny BERT bases with LoRA and prompt-tuning adapters, each with its own trained head and label
set; mixed batches go through the C ABI (ctypes) in one call and every row is compared with
PEFT computed here (<= 1e-4). Token ids come from the bundle's tokenizer (the C++ runtime takes
ids for encoders).
"""

from __future__ import annotations

import ctypes
import json
import subprocess

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from encoder_tiny import SENTENCES, make_encoder_adapter, peft_outputs, save_tiny_encoder
from test_cpp_runtime import CppRuntime, build_cpp

from peft_export.bundle import names
from peft_export.exporter.encoders.export import export_encoder
from peft_export.runtime import load_bundle

TOL = 1e-4
CLS = "sequence-classification"
ADAPTERS = {
    # name: (method, labels, adapter options)
    "sentiment": ("lora", ["negative", "positive"], {"target_modules": ["query", "value"]}),
    "topic": (
        "lora",
        ["sport", "politics", "food", "film"],
        {"target_modules": ["key", "value"], "r": 2},
    ),
    "intent": ("prompt_tuning", ["ask", "tell", "order"], {"num_virtual_tokens": 3}),
}
ROW_ADAPTERS = ["sentiment", "topic", "intent", None, "topic", "sentiment"]


class CppEncoder(CppRuntime):
    """CppRuntime plus peft_export_encode."""

    def __init__(self, build_dir, bundle, **options) -> None:
        super().__init__(build_dir, bundle, **options)
        self.lib.peft_export_encode.restype = ctypes.c_void_p
        self.lib.peft_export_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def encode(self, rows: list[dict], **request) -> dict:
        text = json.dumps({"rows": rows, **request}).encode()
        return self._take(self.lib.peft_export_encode(self.handle, text))


def id_rows(encoded, adapters, pairs: bool = False) -> list[dict]:
    """One request row per encoded row: its unpadded ids (and token types) and adapter."""
    rows = []
    for i, adapter in enumerate(adapters):
        n = int(encoded.attention_mask[i].sum())
        row = {"input_ids": encoded.input_ids[i, :n].tolist(), "adapter": adapter}
        if pairs:
            row["token_type_ids"] = encoded.token_type_ids[i, :n].tolist()
        rows.append(row)
    return rows


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


@pytest.fixture(scope="session")
def cpp_build():
    return build_cpp()


@pytest.fixture(scope="module")
def cls_work(tmp_path_factory):
    """A runtime bundle with three adapters (two LoRA, one prompt tuning), each with its own
    head, and a merged bundle of the first; PEFT's logits per adapter over SENTENCES."""
    root = tmp_path_factory.mktemp("cpp-enc-cls")
    base = save_tiny_encoder("bert", CLS, root / "base")
    dirs = {}
    for seed, (name, (method, labels, options)) in enumerate(ADAPTERS.items(), start=1):
        dirs[name] = make_encoder_adapter(
            base,
            "bert",
            CLS,
            root / name,
            method=method,
            num_labels=len(labels),
            labels=labels,
            seed=seed,
            **dict(options),
        )
    export_encoder(base, list(dirs.items()), out=root / "runtime", mode="runtime")
    export_encoder(base, [("sentiment", dirs["sentiment"])], out=root / "merged")
    encoded = load_bundle(root / "runtime", threads=1).encode(SENTENCES)
    ref = {None: peft_outputs(base, "bert", CLS, None, encoded)["logits"]}
    for name, (_, labels, _) in ADAPTERS.items():
        ref[name] = peft_outputs(base, "bert", CLS, dirs[name], encoded, num_labels=len(labels))[
            "logits"
        ]
    return {"root": root, "dirs": dirs, "base": base, "encoded": encoded, "ref": ref}


@pytest.fixture(scope="module")
def cls_cpp(cpp_build, cls_work):
    runtime = CppEncoder(cpp_build, cls_work["root"] / "runtime", threads=1)
    yield runtime
    runtime.close()


def test_mixed_batch_matches_peft_row_by_row(cls_work, cls_cpp):
    result = cls_cpp.encode(id_rows(cls_work["encoded"], ROW_ADAPTERS))
    assert result["task"] == CLS
    base_labels = ["LABEL_0", "LABEL_1"]
    for i, (adapter, row) in enumerate(zip(ROW_ADAPTERS, result["rows"], strict=True)):
        labels = ADAPTERS[adapter][1] if adapter else base_labels
        ref = cls_work["ref"][adapter][i]
        logits = np.asarray(row["outputs"]["logits"]["values"])
        assert row["adapter"] == adapter and row["labels"] == labels
        assert row["outputs"]["logits"]["shape"] == [len(labels)]
        np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)
        assert row["label"] == labels[int(np.argmax(ref))]
        np.testing.assert_allclose(list(row["scores"].values()), softmax(ref), atol=TOL)
        assert list(row["scores"]) == labels


def test_fused_runtime_bundle_matches_peft_row_by_row(cpp_build, cls_work):
    """`--ort-fusions cpu`: the LoRA deltas feed one MultiHeadAttention a layer."""
    out = cls_work["root"] / "runtime-fused"
    adapters = list(cls_work["dirs"].items())
    export_encoder(
        cls_work["base"], adapters, out=out, mode="runtime", options={"ort_fusions": "cpu"}
    )
    graph = onnx.load(str(out / names.GRAPH), load_external_data=False).graph
    assert sum(node.op_type == "MultiHeadAttention" for node in graph.node) > 0
    runtime = CppEncoder(cpp_build, out, threads=1)
    try:
        result = runtime.encode(id_rows(cls_work["encoded"], ROW_ADAPTERS))
    finally:
        runtime.close()
    for i, (adapter, row) in enumerate(zip(ROW_ADAPTERS, result["rows"], strict=True)):
        logits = row["outputs"]["logits"]["values"]
        np.testing.assert_allclose(logits, cls_work["ref"][adapter][i], atol=TOL, rtol=0)


def test_mixed_batch_equals_each_row_alone_and_fewer_slots(cpp_build, cls_work, cls_cpp):
    rows = id_rows(cls_work["encoded"], ROW_ADAPTERS)
    batch = [r["outputs"]["logits"]["values"] for r in cls_cpp.encode(rows)["rows"]]
    alone = [cls_cpp.encode([row])["rows"][0]["outputs"]["logits"]["values"] for row in rows]
    np.testing.assert_allclose(np.concatenate(batch), np.concatenate(alone), atol=1e-5, rtol=0)
    # Two slots: one adapter per graph call, slots swapped between calls (LRU).
    narrow = CppEncoder(cpp_build, cls_work["root"] / "runtime", threads=1, slots=2)
    try:
        got = [r["outputs"]["logits"]["values"] for r in narrow.encode(rows)["rows"]]
        assert narrow.adapters("status")["swaps"] >= 3
    finally:
        narrow.close()
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(batch), atol=1e-5, rtol=0)


def test_merged_bundle_serves_its_adapter_only(cpp_build, cls_work):
    merged = CppEncoder(cpp_build, cls_work["root"] / "merged", threads=1)
    try:
        rows = id_rows(cls_work["encoded"], ["sentiment"] * len(SENTENCES))
        result = merged.encode(rows)
        got = np.stack([r["outputs"]["logits"]["values"] for r in result["rows"]])
        np.testing.assert_allclose(got, cls_work["ref"]["sentiment"], atol=TOL, rtol=0)
        assert result["rows"][0]["labels"] == ADAPTERS["sentiment"][1]
        with pytest.raises(RuntimeError, match="serves only 'sentiment', not 'topic'"):
            merged.encode([{**rows[0], "adapter": "topic"}])
    finally:
        merged.close()


def test_bad_requests_are_refused_with_the_fix(cls_work, cls_cpp):
    row = id_rows(cls_work["encoded"], ["sentiment"])[0]
    cases = [
        ({**row, "adapter": "nope"}, "unknown adapter 'nope' \\(installed: intent, sentiment"),
        ({**row, "input_ids": [2, 10**6, 3]}, "token ids outside \\[0, 160\\)"),
        ({**row, "input_ids": [2] * 200}, "more than the model's 96; truncate it"),
        ({**row, "input_ids": []}, "row 0 has no token ids"),
        ({**row, "attention_mask": [1]}, "attention_mask has 1 entries"),
    ]
    for bad, message in cases:
        with pytest.raises(RuntimeError, match=message):
            cls_cpp.encode([bad])
    with pytest.raises(RuntimeError, match="encoder .* bundle, which does not generate"):
        cls_cpp.generate([{"prompt_ids": row["input_ids"]}])
    assert cls_cpp.encode([row])["rows"][0]["labels"] == ADAPTERS["sentiment"][1]


def test_peft_encode_prints_what_peft_export_run_prints(cpp_build, cls_work, capsys):
    bundle = cls_work["root"] / "runtime"
    adapters = ["sentiment", "topic", "intent", "-"]
    args = ["run", str(bundle)]
    for text, adapter in zip(SENTENCES, adapters, strict=False):
        args += ["--prompt", text, "--adapter", adapter]
    capsys.readouterr()
    assert run_cli(*args) == 0
    python_lines = capsys.readouterr().out.splitlines()
    command = [str(cpp_build / "peft-encode"), str(bundle), "--threads", "1"]
    for row, adapter in zip(id_rows(cls_work["encoded"], adapters), adapters, strict=False):
        command += ["--ids", ",".join(map(str, row["input_ids"])), "--adapter", adapter]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == python_lines
    refused = subprocess.run(
        [*command[:4], "--ids", "2,3", "--adapter", "nope"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "unknown adapter 'nope'" in refused.stderr
    generate = subprocess.run(
        [str(cpp_build / "peft-generate"), str(bundle), "--ids", "2,3"],
        capture_output=True,
        text=True,
    )
    assert generate.returncode == 2 and "open it with peft_export::Encoder" in generate.stderr


@pytest.mark.parametrize(
    "task", ["token-classification", "question-answering", "feature-extraction"]
)
def test_other_tasks_match_peft(cpp_build, tmp_path, task):
    labels = (
        {"a": ["O", "B-LOC", "I-LOC"], "b": ["O", "X"]} if task == "token-classification" else {}
    )
    base = save_tiny_encoder("bert", task, tmp_path / "base")
    dirs = {
        name: make_encoder_adapter(
            base,
            "bert",
            task,
            tmp_path / name,
            num_labels=len(labels[name]) if labels else None,
            labels=labels.get(name),
            seed=seed,
            r=seed * 2,
        )
        for seed, name in enumerate(["a", "b"], start=1)
    }
    export_encoder(base, list(dirs.items()), out=tmp_path / "bundle", mode="runtime")
    python = load_bundle(tmp_path / "bundle", threads=1)
    pairs = task == "question-answering"
    encoded = python.encode(SENTENCES[:3], SENTENCES[3:]) if pairs else python.encode(SENTENCES)
    count = len(encoded.encodings)
    adapters = ["a", "b", None, "b", "a", None][:count]
    pooling = {}
    if task == "feature-extraction":
        mode = python.info.pooling.get("mode", "mean")
        pooling = {"pooling": mode, "normalize": python.info.pooling.get("normalize", False)}
    refs = {}
    for name in ("a", "b", None):
        count_labels = len(labels[name]) if labels and name else None
        adapter_dir = dirs[name] if name else None
        refs[name] = peft_outputs(
            base, "bert", task, adapter_dir, encoded, num_labels=count_labels, **pooling
        )
    cpp = CppEncoder(cpp_build, tmp_path / "bundle", threads=1)
    try:
        result = cpp.encode(id_rows(encoded, adapters, pairs=pairs))
    finally:
        cpp.close()
    for i, (adapter, row) in enumerate(zip(adapters, result["rows"], strict=True)):
        n = int(encoded.attention_mask[i].sum())
        for name, ref in refs[adapter].items():
            got = np.asarray(row["outputs"][name]["values"]).reshape(row["outputs"][name]["shape"])
            want = ref[i, :n] if task != "feature-extraction" else ref[i]
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        if task == "token-classification":
            own = labels[adapter] if adapter else python.labels(None)
            want = [own[k] for k in refs[adapter]["logits"][i, :n].argmax(axis=1)]
            assert [tag["label"] for tag in row["tags"]] == want
        if task == "feature-extraction":
            np.testing.assert_allclose(row["embedding"], refs[adapter]["embeddings"][i], atol=TOL)
