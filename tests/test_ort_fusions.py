"""`export --ort-fusions cpu`: an opset-23 graph with fused kernels that still equals PEFT.

`verify` computes the PEFT reference itself (prefill and decode logits, greedy tokens), so
these tests fail if the fused graph drifts from the model, and they check that the fusion
really happened (fused ops present) so a silently skipped rewrite cannot pass.
"""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
from cli_run import run_cli
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export import plugins
from peft_export.bundle import load_manifest, names
from peft_export.runtime import load_bundle


def _ops(bundle) -> set[str]:
    graph = onnx.load(str(bundle / names.GRAPH), load_external_data=False).graph
    return {n.op_type for n in graph.node}


def _lora_nodes(bundle) -> Counter:
    """The peft_export ops of the main graph but SlotScale (the DoRA/IA3 scales), counted.
    Checks that every module's A and B bank feeds exactly one of them and that each op has
    its function body."""
    model = onnx.load(str(bundle / names.GRAPH), load_external_data=False)
    ours = [n for n in model.graph.node if n.domain == names.MULTILORA_DOMAIN]

    def banks(tensors) -> list[str]:
        return sorted(t for t in tensors if (p := names.split_lora_input(t)) and p[1] in "AB")

    declared = (t.name for t in load_manifest(bundle).graph.inputs)
    assert banks(t for n in ours for t in n.input) == banks(declared)
    assert {n.op_type for n in ours} <= {f.name for f in model.functions}
    return Counter(n.op_type for n in ours if n.op_type != names.SLOT_SCALE_OP)


@pytest.mark.parametrize(
    ("arch", "fused"),
    [
        ("llama", {"Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"}),
        ("qwen2", {"Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"}),
        ("gpt2", {"Attention", "LayerNormalization"}),
    ],
)
def test_fused_merged_bundle_matches_peft(tmp_path, arch, fused) -> None:
    base = save_tiny_base(arch, tmp_path / "base")
    adapter = make_adapter(tiny_model(arch), "lora", tmp_path, seed=3)
    bundle = tmp_path / "bundle"
    argv = ["export", "--base", str(base), "--adapter", f"a={adapter}", "--ort-fusions", "cpu"]
    assert run_cli(*argv, "--out", str(bundle)) == 0
    assert load_manifest(bundle).graph.ort_fusions == "cpu"
    assert fused <= _ops(bundle)
    assert "SkipLayerNormalization" not in _ops(bundle)  # slower on CPU than Add + norm
    args = ("--prompt", "hello", "--prompt", "a b c", "--max-new-tokens", "16")
    assert run_cli("verify", str(bundle), *args, "--decode-steps", "8") == 0
    (entry,) = json.loads((bundle / names.PARITY_REPORT).read_text())["adapters"]
    assert entry["prefill_logits"]["max_abs"] <= 1e-4
    assert entry["decode_logits"]["max_abs"] <= 1e-4
    assert entry["prompts_identical"] == 2

    bundle_run = load_bundle(bundle)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    batch = bundle_run.generate(rows, max_new_tokens=8, ignore_eos=True).token_ids
    alone = [bundle_run.generate([r], max_new_tokens=8, ignore_eos=True).token_ids[0] for r in rows]
    assert batch == alone, "a left-padded batch must equal its rows run alone"


def test_fused_runtime_bundle_mixed_batch_matches_peft(tmp_path) -> None:
    base = save_tiny_base("llama", tmp_path / "base")
    model = tiny_model("llama")
    lora = make_adapter(model, "lora", tmp_path, seed=1)
    dora = make_adapter(model, "dora", tmp_path, seed=2, r=2)
    bundle = tmp_path / "bundle"
    argv = ["export", "--base", str(base), "--mode", "runtime", "--ort-fusions", "cpu"]
    argv += ["--adapter", f"l={lora}", "--adapter", f"d={dora}", "--out", str(bundle)]
    assert run_cli(*argv) == 0
    assert {"Attention", "RotaryEmbedding"} <= _ops(bundle)
    # q/k/v and gate/up share an input and a packed MatMul: one node each; o and down alone.
    layers = tiny_model("llama").config.num_hidden_layers
    assert _lora_nodes(bundle) == {
        names.multilora_add_op(3): layers,
        names.multilora_add_op(2): layers,
        names.multilora_add_op(1): 2 * layers,
    }
    assert run_cli("verify", str(bundle), "--prompt", "hello", "--max-new-tokens", "8") == 0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_fused_runtime_bundle_of_other_architectures_matches_peft(tmp_path, arch) -> None:
    """Qwen2's q/k/v biases and GPT-2's one c_attn module change what the rewrite into
    MultiLoRAAdd{n} finds; `verify` checks the result against PEFT."""
    base = save_tiny_base(arch, tmp_path / "base")
    lora = make_adapter(tiny_model(arch), "lora", tmp_path, seed=6)
    bundle = tmp_path / "bundle"
    argv = ["export", "--base", str(base), "--mode", "runtime", "--ort-fusions", "cpu"]
    assert run_cli(*argv, "--adapter", f"l={lora}", "--out", str(bundle)) == 0
    ops = _lora_nodes(bundle)
    assert ops and all(op.startswith(names.MULTILORA_ADD_OP) for op in ops)
    assert run_cli("verify", str(bundle), "--prompt", "hello", "--max-new-tokens", "8") == 0
    report = json.loads((bundle / names.PARITY_REPORT).read_text())
    (entry,) = [e for e in report["adapters"] if e["adapter"] == "l"]
    assert entry["prefill_logits"]["max_abs"] <= 1e-4
    assert entry["decode_logits"]["max_abs"] <= 1e-4


@pytest.mark.parametrize(
    ("second", "methods", "ops"),
    [
        # By default IA3 scales only the feed-forward modules' inputs (down_proj, alone
        # anyway): q/k/v and gate/up still share theirs and stay packed.
        ("ia3", (), {1, 2, 3}),
        ("ia3", ("--methods", "lora,ia3"), {1}),  # in_scale on every module: no packing
        ("dora", (), {1, 2, 3}),
    ],
)
def test_fused_runtime_bundle_runs_the_cpu_kernel(
    tmp_path, monkeypatch, cpu_kernel_library, second, methods, ops
):
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(cpu_kernel_library.parent))
    base = save_tiny_base("llama", tmp_path / "base")
    model = tiny_model("llama")
    lora = make_adapter(model, "lora", tmp_path, seed=4)
    other = make_adapter(model, second, tmp_path, seed=5, **({"r": 2} if second == "dora" else {}))
    bundle = tmp_path / "bundle"
    argv = ["export", "--base", str(base), "--mode", "runtime", "--ort-fusions", "cpu"]
    argv += ["--adapter", f"l={lora}", "--adapter", f"o={other}", "--out", str(bundle), *methods]
    assert run_cli(*argv) == 0
    assert set(_lora_nodes(bundle)) == {names.multilora_add_op(n) for n in ops}
    kernel = load_bundle(bundle, multilora_kernel="on")
    body = load_bundle(bundle, multilora_kernel="off")
    assert kernel.describe()["multilora"] == f"cpu kernel ({cpu_kernel_library})"
    prompts = [[5, 17, 42, 99], [7, 8, 9], [11, 12, 13, 14, 15]]
    adapters = ["l", "o", None]
    got = kernel.generate(prompts, adapters=adapters, max_new_tokens=6, ignore_eos=True)
    want = body.generate(prompts, adapters=adapters, max_new_tokens=6, ignore_eos=True)
    assert got.token_ids == want.token_ids


def test_tensorrt_refuses_fused_graphs(tmp_path, capsys) -> None:
    base = save_tiny_base("llama", tmp_path / "base")
    out = tmp_path / "both"
    capsys.readouterr()
    argv = ["export", "--base", str(base), "--ort-fusions", "cpu", "--engine", "trt"]
    assert run_cli(*argv, "--out", str(out)) == 2
    assert "drop --ort-fusions" in capsys.readouterr().err
    assert not out.exists()
    fused = tmp_path / "fused"
    assert run_cli("export", "--base", str(base), "--ort-fusions", "cpu", "--out", str(fused)) == 0
    before = sorted(p.name for p in fused.rglob("*"))
    capsys.readouterr()
    assert run_cli("build-engine", str(fused)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "re-export it without --ort-fusions" in errors[0]
    assert sorted(p.name for p in fused.rglob("*")) == before
