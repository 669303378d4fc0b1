"""The C++ runtime (runtime/cpp) against the Python runtime on tiny exported bundles.

The C++ library is built once per session (or taken from PEFT_EXPORT_CPP_BUILD) and driven
through its C ABI with ctypes and through the peft-generate program. Every expectation is
computed here by the Python runtime, never stored.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny import make_adapter, make_adapters, save_tiny_tokenizer, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 17, 42, 99, 5, 230, 64], [1, 50], [1, 200, 13, 99, 4, 7, 8, 9, 10]]
VARIANTS = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "ia3": ("ia3", {}),
    "prefix": ("prefix_tuning", {}),
    "prompt": ("prompt_tuning", {}),
    "adaption": ("adaption_prompt", {}),
    "cpt": ("cpt", {}),
}
ADAPTERS = [None, *VARIANTS]


def build_cpp(build_dir: Path | None = None, *extra: str) -> Path:
    """Configure and build runtime/cpp (incremental); returns the build folder."""
    given = os.environ.get("PEFT_EXPORT_CPP_BUILD")
    if given and build_dir is None:
        return Path(given)
    build_dir = build_dir or REPO / "build" / "cpp"
    build_dir.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers share the build folder: one configures and builds at a time.
    with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _configure_and_build(build_dir, extra)
    return build_dir


def _configure_and_build(build_dir: Path, extra: tuple[str, ...]) -> None:
    headers = subprocess.run(
        [str(REPO / "scripts" / "fetch_ort_headers.sh")], capture_output=True, text=True
    )
    assert headers.returncode == 0, headers.stderr
    configure = ["cmake", "-S", str(REPO / "runtime" / "cpp"), "-B", str(build_dir), *extra]
    configure.append(f"-DPython3_EXECUTABLE={sys.executable}")
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


class CppRuntime:
    """ctypes wrapper of include/peft_export/c_api.h."""

    def __init__(self, build_dir: Path, bundle: Path, **options) -> None:
        lib = ctypes.CDLL(str(build_dir / "libpeft_export_runtime.so"))
        lib.peft_export_open.restype = ctypes.c_void_p
        lib.peft_export_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.peft_export_generate.restype = ctypes.c_void_p
        lib.peft_export_generate.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.peft_export_adapters.restype = ctypes.c_void_p
        lib.peft_export_adapters.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.peft_export_last_error.restype = ctypes.c_char_p
        lib.peft_export_free.argtypes = [ctypes.c_void_p]
        lib.peft_export_close.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.handle = lib.peft_export_open(str(bundle).encode(), json.dumps(options).encode())
        if not self.handle:
            raise RuntimeError(self.error())

    def error(self) -> str:
        return self.lib.peft_export_last_error().decode()

    def _take(self, pointer) -> dict:
        if not pointer:
            raise RuntimeError(self.error())
        try:
            return json.loads(ctypes.string_at(pointer).decode())
        finally:
            self.lib.peft_export_free(pointer)

    def generate(self, rows: list[dict]) -> dict:
        request = json.dumps({"rows": rows}).encode()
        return self._take(self.lib.peft_export_generate(self.handle, request))

    def ids(self, prompts, adapters, **options) -> list[list[int]]:
        rows = [
            {"prompt_ids": p, "adapter": a, **options}
            for p, a in zip(prompts, adapters, strict=True)
        ]
        return [row["token_ids"] for row in self.generate(rows)["rows"]]

    def adapters(self, op: str, name: str = "") -> dict:
        return self._take(self.lib.peft_export_adapters(self.handle, op.encode(), name.encode()))

    def close(self) -> None:
        if self.handle:
            self.lib.peft_export_close(self.handle)
            self.handle = None


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    return build_cpp()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A runtime-mode tiny Llama bundle serving LoRA, DoRA, IA3 and prompt-side adapters."""
    from peft_export.exporter.pipeline import InMemoryBase, export_bundle
    from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    tmp = tmp_path_factory.mktemp("cpp-llama")
    base = tiny_model("llama")
    dirs = make_adapters(base, VARIANTS, tmp / "adapters", first_seed=3)
    tokenizer = save_tiny_tokenizer(tmp / "tokenizer")
    export_bundle(
        InMemoryBase(base, tokenizer),
        list(dirs.items()),
        out=tmp / "bundle",
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"prefix_max_len": 8},
    )
    return tmp / "bundle"


@pytest.fixture(scope="module")
def python_bundle(tiny_bundle):
    from peft_export.runtime.session import load_bundle

    return load_bundle(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def cpp(cpp_build, tiny_bundle):
    runtime = CppRuntime(cpp_build, tiny_bundle, threads=1)
    yield runtime
    runtime.close()


def python_ids(bundle, prompts, adapters, max_new_tokens=12) -> list[list[int]]:
    return bundle.generate(prompts, adapters=adapters, max_new_tokens=max_new_tokens).token_ids


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_ids_equal_python_runtime(cpp, python_bundle, adapter):
    for prompt in PROMPTS[:2]:
        expected = python_ids(python_bundle, [prompt], [adapter])
        assert cpp.ids([prompt], [adapter], max_new_tokens=12) == expected


def test_huge_pages_off_gives_the_same_ids(cpp_build, tiny_bundle, cpp):
    plain = CppRuntime(cpp_build, tiny_bundle, threads=1, huge_pages=False)
    try:
        for adapter in ADAPTERS:
            want = cpp.ids([PROMPTS[0]], [adapter], max_new_tokens=8)
            assert plain.ids([PROMPTS[0]], [adapter], max_new_tokens=8) == want
    finally:
        plain.close()


def test_adapters_change_the_output(cpp):
    outputs = {tuple(cpp.ids([PROMPTS[0]], [a], max_new_tokens=12)[0]) for a in ADAPTERS}
    assert len(outputs) == len(ADAPTERS)


def test_mixed_adapter_batch_equals_each_row_alone(cpp, python_bundle):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(ADAPTERS))]
    batch = cpp.ids(prompts, ADAPTERS, max_new_tokens=10)
    alone = [
        cpp.ids([p], [a], max_new_tokens=10)[0] for p, a in zip(prompts, ADAPTERS, strict=True)
    ]
    assert batch == alone
    assert batch == python_ids(python_bundle, prompts, ADAPTERS, max_new_tokens=10)


def test_stop_tokens_and_finish_reasons(cpp, python_bundle):
    free = cpp.generate([{"prompt_ids": PROMPTS[0], "max_new_tokens": 6, "ignore_eos": True}])
    tokens = free["rows"][0]["token_ids"]
    assert free["rows"][0]["finish_reason"] == "length" and len(tokens) == 6
    stop = tokens[2]
    rows = cpp.generate([{"prompt_ids": PROMPTS[0], "max_new_tokens": 6, "stop_token_ids": [stop]}])
    row = rows["rows"][0]
    assert row["token_ids"] == tokens[: tokens.index(stop) + 1]
    assert row["finish_reason"] == "stop_token"
    expected = python_bundle.generate(PROMPTS[0], max_new_tokens=6, stop_token_ids=[stop])
    assert row["token_ids"] == expected.token_ids[0]
    zero = cpp.generate([{"prompt_ids": PROMPTS[0], "max_new_tokens": 0}])
    assert zero["rows"][0]["token_ids"] == [] and zero["steps"] == 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(cpp):
    row = {"prompt_ids": PROMPTS[0], "max_new_tokens": 8, "temperature": 0.9, "seed": 7}
    first, again = cpp.generate([row]), cpp.generate([row])
    assert first["rows"][0]["token_ids"] == again["rows"][0]["token_ids"]
    greedy = cpp.ids([PROMPTS[0]], [None], max_new_tokens=8)[0]
    top1 = cpp.generate([{**row, "top_k": 1}])["rows"][0]["token_ids"]
    assert top1 == greedy


def test_adapter_store_matches_python_store(cpp_build, tiny_bundle):
    """Same request sequence, 3 slots: the same adapters end up in the same slots."""
    from peft_export.bundle.manifest import load_manifest
    from peft_export.runtime.adapter_store import AdapterStore

    sequence = [["lora"], ["dora", None], ["lora"], ["ia3"], ["dora", "lora"], ["ia3", "dora"]]
    runtime = CppRuntime(cpp_build, tiny_bundle, threads=1, slots=3)
    store = AdapterStore(tiny_bundle, load_manifest(tiny_bundle), slots=3)
    try:
        for adapters in sequence:
            store.release(store.acquire(adapters))
            runtime.ids([PROMPTS[1]] * len(adapters), adapters, max_new_tokens=1)
            state = runtime.adapters("status")
            assert state["resident"] == store.resident(), adapters
        assert state["swaps"] == store.swaps
        assert runtime.adapters("drop", "dora")["dropped"] is True
        assert store.drop("dora") is True
        assert runtime.adapters("status")["resident"] == store.resident()
        runtime.ids([PROMPTS[1]], ["prefix"], max_new_tokens=1)
        assert "prefix" in runtime.adapters("status")["held"]
        with pytest.raises(RuntimeError, match="unknown adapter 'nope'.*adapters add"):
            runtime.adapters("load", "nope")
        with pytest.raises(RuntimeError, match="3 different adapters but the banks hold 2"):
            runtime.ids([PROMPTS[1]] * 3, ["lora", "dora", "ia3"], max_new_tokens=1)
    finally:
        runtime.close()


def test_adapter_replaced_while_serving_is_read_again(cpp_build, tiny_bundle, tmp_path):
    """`adapters add --replace` on a bundle the C++ runtime serves (issue 21 item 1): the next
    request uses the new file, whose bytes C++ hashes against the sha256 Python recorded."""
    import shutil

    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
    from peft_export.runtime.session import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    runtime = CppRuntime(cpp_build, bundle, threads=1, slots=3)
    try:
        before = runtime.ids([PROMPTS[0]], ["lora"], max_new_tokens=8)
        source = make_adapter(tiny_model("llama"), "lora", tmp_path, name="lora-v2", seed=41)
        add_adapter(bundle, "lora", source, replace=True)
        after = runtime.ids([PROMPTS[0]], ["lora"], max_new_tokens=8)
        want = python_ids(load_bundle(bundle, threads=1), [PROMPTS[0]], ["lora"], 8)
        assert after == want
        assert after != before, "the new adapter should change the greedy ids"
        assert list(runtime.adapters("status")["resident"]) == ["lora"]
    finally:
        runtime.close()


def test_lora_family_files_are_gated_on_inputs_not_method_names(cpp_build, tiny_bundle, tmp_path):
    """Issue 21 item 4: a manifest that names only the methods its bundle was exported for
    (as bundles from before the fix do) still serves an rsLoRA file, which fills the same A/B
    bank inputs as a LoRA one; Python and C++ agree on it."""
    import shutil

    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
    from peft_export.runtime.session import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    source = make_adapter(tiny_model("llama"), "rslora", tmp_path, name="rs", seed=43)
    add_adapter(bundle, "rs", source)
    manifest = json.loads((bundle / "manifest.json").read_text())
    methods = manifest["adapters"]["methods"]
    added_later = ("rslora", "adalora", "loha", "lokr")  # what an older exporter left out
    manifest["adapters"]["methods"] = [m for m in methods if m not in added_later]
    assert "rslora" not in manifest["adapters"]["methods"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = CppRuntime(cpp_build, bundle, threads=1)
    try:
        got = runtime.ids([PROMPTS[0]], ["rs"], max_new_tokens=8)
    finally:
        runtime.close()
    assert got == python_ids(load_bundle(bundle, threads=1), [PROMPTS[0]], ["rs"], 8)
    assert got != python_ids(load_bundle(bundle, threads=1), [PROMPTS[0]], [None], 8)


def test_concurrent_requests_equal_sequential(cpp_build, tiny_bundle):
    runtime = CppRuntime(cpp_build, tiny_bundle, threads=1, slots=3)
    jobs = [([PROMPTS[i % 3]], [a]) for i, a in enumerate(["lora", "dora", "ia3", None] * 2)]
    expected = [runtime.ids(p, a, max_new_tokens=8) for p, a in jobs]
    results: list = [None] * len(jobs)

    def worker(i: int) -> None:
        for _ in range(3):
            results[i] = runtime.ids(*jobs[i], max_new_tokens=8)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runtime.close()
    assert results == expected


def test_multilora_cpu_kernel_gives_the_same_ids(
    cpp_build, tiny_bundle, python_bundle, cpu_kernel_library, tmp_path
):
    library = str(cpu_kernel_library)
    runtime = CppRuntime(cpp_build, tiny_bundle, threads=1, multilora_library=library)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(ADAPTERS))]
    try:
        got = runtime.ids(prompts, ADAPTERS, max_new_tokens=10)
    finally:
        runtime.close()
    assert got == python_ids(python_bundle, prompts, ADAPTERS, max_new_tokens=10)
    with pytest.raises(RuntimeError, match="no such file; build it with scripts/build_cpu"):
        CppRuntime(cpp_build, tiny_bundle, multilora_library=str(tmp_path / "missing.so"))


def test_text_prompts_use_the_bundle_tokenizer(cpp, python_bundle):
    text = "Hello, world! It's 2026."
    ids = tiny_tokenizer().encode(text).ids
    out = cpp.generate([{"text": text, "max_new_tokens": 6, "ignore_eos": True}])["rows"][0]
    assert out["prompt_ids"] == ids
    expected = python_bundle.generate(ids, max_new_tokens=6, ignore_eos=True)
    assert out["token_ids"] == expected.token_ids[0]
    assert out["text"] == tiny_tokenizer().decode(out["token_ids"])


def test_peft_generate_program(cpp_build, tiny_bundle, python_bundle):
    program = cpp_build / "peft-generate"
    ids = ",".join(map(str, PROMPTS[0]))
    done = subprocess.run(
        [
            program,
            tiny_bundle,
            "--adapter",
            "lora",
            "--adapter",
            "-",
            "--ids",
            ids,
            "--ids",
            "1,50",
            "--max-new-tokens",
            "5",
            "--threads",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    expected = python_ids(python_bundle, [PROMPTS[0], [1, 50]], ["lora", None], max_new_tokens=5)
    assert [r["token_ids"] for r in rows] == expected
    bad = subprocess.run(
        [program, tiny_bundle, "--adapter", "nope", "--ids", "1,2"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown adapter 'nope'") and "adapters add" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_malformed_bundles_are_refused_with_the_fix(cpp_build, tiny_bundle, tmp_path):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    cases = {
        "schema_version": (99, "newer than this peft-export runtime understands"),
        "mode": ("fused", "expected one of merged, runtime"),
        "vocab_size": (-3, "vocab_size must not be negative"),
    }
    for key, (value, message) in cases.items():
        (broken / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(RuntimeError, match=message):
            CppRuntime(cpp_build, broken)
    escaped = {**manifest, "graph": {**manifest["graph"], "file": "../model.onnx"}}
    (broken / "manifest.json").write_text(json.dumps(escaped))
    with pytest.raises(RuntimeError, match="escapes the bundle"):
        CppRuntime(cpp_build, broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    adapter = broken / "adapters" / "lora.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])
    runtime = CppRuntime(cpp_build, broken, threads=1)
    with pytest.raises(RuntimeError, match="points outside the file"):
        runtime.ids([PROMPTS[1]], ["lora"], max_new_tokens=1)
    runtime.close()


def test_ort_fused_bundle_equals_python_runtime(cpp_build, cpu_kernel_library, tmp_path):
    """A runtime bundle exported with --ort-fusions cpu (opset 23 + contrib ops, LoRA in
    MultiLoRAAdd{n} nodes) runs in C++ with the MultiLoRA CPU kernel, as in Python."""
    import onnx
    from transformers import AutoModelForCausalLM

    from peft_export.exporter.graph.ort_fusions import ORT_OPSET, ort_fusion_step
    from peft_export.exporter.pipeline import InMemoryBase, export_bundle
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
    from peft_export.runtime.session import load_bundle

    base = tiny_model("llama")
    sdpa = AutoModelForCausalLM.from_config(base.config, attn_implementation="sdpa")
    sdpa.load_state_dict(base.state_dict())
    adapter = make_adapter(base, "lora", tmp_path, seed=5)
    bundle = tmp_path / "fused"
    export_bundle(
        InMemoryBase(sdpa.eval(), save_tiny_tokenizer(tmp_path / "tokenizer")),
        [("a", adapter)],
        out=bundle,
        mode="runtime",
        planners=[plan_lora_banks],
        options={"ort_fusions": "cpu"},
        post_steps=[ort_fusion_step],
        opset=ORT_OPSET,
    )
    ops = {n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node}
    assert {"Attention", "SkipSimplifiedLayerNormalization", "MultiLoRAAdd3"} <= ops
    library = str(cpu_kernel_library)
    runtime = CppRuntime(cpp_build, bundle, threads=1, multilora_library=library)
    adapters = ["a", None, "a"]
    try:
        got = runtime.ids(PROMPTS[:3], adapters, max_new_tokens=10)
    finally:
        runtime.close()
    want = python_ids(load_bundle(bundle, threads=1), PROMPTS[:3], adapters, 10)
    assert got == want


QUANT_ADAPTERS = {
    "int4": [None, "lora", "lora2"],
    "int8": [None, None, None],
    "nbits": [None, "lora", "lora"],
}
"""Rows' adapters per quantized bundle: int4 and nbits serve LoRA banks, int8 has one merged."""


@pytest.fixture(scope="module")
def quantized_bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama bundles on quantized bases: int4 with runtime LoRA banks, int8 with a LoRA
    merged in (both the default DequantizeLinear form, served at level 4), and int4 with
    written-out MatMulNBits nodes (level 4 in the nodes)."""
    from peft_export.exporter.pipeline import InMemoryBase, export_bundle
    from peft_export.exporter.quantize.scheme import QuantScheme
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    tmp = tmp_path_factory.mktemp("cpp-quant")
    base = tiny_model("llama")
    lora = make_adapter(base, "lora", tmp / "adapters", name="lora", seed=3)
    lora2 = make_adapter(base, "lora", tmp / "adapters", name="lora2", seed=5)
    model = InMemoryBase(base, save_tiny_tokenizer(tmp / "tokenizer"))
    runtime = {"mode": "runtime", "planners": [plan_lora_banks]}
    bundles = {name: tmp / name for name in QUANT_ADAPTERS}
    export_bundle(
        model,
        [("lora", lora), ("lora2", lora2)],
        out=bundles["int4"],
        quantize=QuantScheme.parse("int4"),
        **runtime,
    )
    export_bundle(model, [("lora", lora)], out=bundles["int8"], quantize=QuantScheme.parse("int8"))
    nbits = QuantScheme.parse("int4", graph_format="matmulnbits")
    export_bundle(model, [("lora", lora)], out=bundles["nbits"], quantize=nbits, **runtime)
    return bundles


@pytest.mark.parametrize("level", [None, 4, 1])
@pytest.mark.parametrize("name", ["int4", "int8"])
def test_quantized_bundle_equals_python_runtime_at_the_same_level(
    cpp_build, quantized_bundles, name, level
):
    """None: the bundle's own level (4, int8 activations); 1: float32 compute."""
    from peft_export.runtime.session import load_bundle

    bundle, adapters = quantized_bundles[name], QUANT_ADAPTERS[name]
    options = {} if level is None else {"quant_accuracy": level}
    runtime = CppRuntime(cpp_build, bundle, threads=1, **options)
    try:
        batch = runtime.ids(PROMPTS, adapters, max_new_tokens=10)
        rows = zip(PROMPTS, adapters, strict=True)
        alone = [runtime.ids([p], [a], max_new_tokens=10)[0] for p, a in rows]
    finally:
        runtime.close()
    python = load_bundle(bundle, threads=1, quant_accuracy=level)
    assert batch == python_ids(python, PROMPTS, adapters, max_new_tokens=10)
    assert alone == batch


def test_matmulnbits_bundle_runs_at_its_own_level_only(cpp_build, quantized_bundles):
    """Its nodes carry level 4: served at 4 it equals Python; another level, which the Python
    runtime gets by rewriting the nodes, is refused in one line instead."""
    from peft_export.runtime.session import load_bundle

    bundle, adapters = quantized_bundles["nbits"], QUANT_ADAPTERS["nbits"]
    want = python_ids(load_bundle(bundle, threads=1), PROMPTS, adapters, max_new_tokens=10)
    for options in ({}, {"quant_accuracy": -1}, {"quant_accuracy": 4}):
        runtime = CppRuntime(cpp_build, bundle, threads=1, **options)
        try:
            assert runtime.ids(PROMPTS, adapters, max_new_tokens=10) == want
        finally:
            runtime.close()
    with pytest.raises(RuntimeError) as refused:
        CppRuntime(cpp_build, bundle, quant_accuracy=1)
    message = str(refused.value)
    assert message.startswith("quant_accuracy 1 differs from the level 4 this bundle's MatMulNBits")
    assert "re-export with --quant-accuracy 1" in message and "\n" not in message


def test_peft_generate_takes_quant_accuracy(cpp_build, quantized_bundles):
    from peft_export.runtime.session import load_bundle

    program, bundle = cpp_build / "peft-generate", quantized_bundles["int8"]
    command = [program, bundle, "--ids", "1,17,42,99,5,230,64", "--max-new-tokens", "10"]
    done = subprocess.run(
        [*command, "--threads", "1", "--quant-accuracy", "1", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    got = [r["token_ids"] for r in json.loads(done.stdout)["rows"]]
    python = load_bundle(bundle, threads=1, quant_accuracy=1)
    assert got == python_ids(python, [PROMPTS[0]], [None], max_new_tokens=10)
    bad = subprocess.run([*command, "--quant-accuracy", "7"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: quant_accuracy 7 is not a MatMulNBits accuracy level")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_malformed_quantization_is_refused_naming_the_field(cpp_build, quantized_bundles, tmp_path):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(quantized_bundles["int8"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    cases = {
        "format": ("int4", "quantization.format is 'int4', expected one of qdq, matmulnbits"),
        "accuracy_level": (9, "quantization.accuracy_level is 9, expected 0 to 4"),
        "bits": ("4", "quantization.bits must be an integer"),
    }
    for key, (value, message) in cases.items():
        quantization = {**manifest["quantization"], key: value}
        (broken / "manifest.json").write_text(
            json.dumps({**manifest, "quantization": quantization})
        )
        with pytest.raises(RuntimeError, match=message):
            CppRuntime(cpp_build, broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match='options: quant_accuracy is "fast"; use 0 to 4'):
        CppRuntime(cpp_build, broken, quant_accuracy="fast")
