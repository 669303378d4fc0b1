"""Per-architecture knowledge, in one place: a registry of ArchSpec keyed by HF `model_type`.

Every other part (merge, graph wrapper, runtime banks, tests) asks this registry instead of
branching on the architecture, so adding a model family is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peft_export.exporter.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    """How to read one model family's config and where its adapter targets live."""

    model_type: str
    layers_key: str
    heads_key: str
    kv_heads_key: str | None
    """Config field with the KV head count; None: every head has its own KV (no GQA)."""
    hidden_key: str
    vocab_key: str
    max_positions_key: str
    embed_tokens: str
    """Dotted path of the token embedding inside the *CausalLM model."""
    attention_modules: tuple[str, ...]
    mlp_modules: tuple[str, ...]
    feedforward_modules: tuple[str, ...]
    """Targets whose IA3 vector scales the input (PEFT's feedforward_modules default)."""
    conv1d_weights: bool = False
    """Weights stored [in, out] (transformers Conv1D): PEFT needs fan_in_fan_out."""
    learned_positions: bool = False
    """Absolute position embeddings: the graph feeds position_ids to them (GPT-2)."""
    tiny_config: Callable[..., dict[str, Any]] = field(default=dict, compare=False)
    """Config kwargs of a tiny random model for tests (overridable by keyword)."""
    expert_parameters: tuple[str, ...] = ()
    """Fused 3-D expert weights of a mixture-of-experts block (PEFT `target_parameters`):
    LoRA on them merges exactly, but they are no linear layer, so runtime banks refuse them."""

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.attention_modules + self.mlp_modules

    def num_layers(self, config: Any) -> int:
        return int(_get(config, self.layers_key))

    def num_heads(self, config: Any) -> int:
        return int(_get(config, self.heads_key))

    def num_kv_heads(self, config: Any) -> int:
        if self.kv_heads_key is None:
            return self.num_heads(config)
        value = _get(config, self.kv_heads_key, None)
        return int(value) if value is not None else self.num_heads(config)

    def hidden_size(self, config: Any) -> int:
        return int(_get(config, self.hidden_key))

    def head_dim(self, config: Any) -> int:
        value = _get(config, "head_dim", None)
        return int(value) if value else self.hidden_size(config) // self.num_heads(config)

    def vocab_size(self, config: Any) -> int:
        return int(_get(config, self.vocab_key))

    def max_positions(self, config: Any) -> int:
        return int(_get(config, self.max_positions_key))


def _get(config: Any, key: str, *default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, *default) if default else config[key]
    return getattr(config, key, *default)


def _tiny_llama(**overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 260,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        **overrides,
    }


def _tiny_qwen2(**overrides: Any) -> dict[str, Any]:
    return _tiny_llama(**{"use_sliding_window": False, **overrides})


def _tiny_gpt2(**overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 260,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **overrides,
    }


def _tiny_qwen3(**overrides: Any) -> dict[str, Any]:
    return _tiny_llama(**{"head_dim": 16, "use_sliding_window": False, **overrides})


def _tiny_granite(**overrides: Any) -> dict[str, Any]:
    """Granite 3's multipliers (embedding, residual, attention, logits), not the neutral 1.0."""
    multipliers = {
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.0625,
        "logits_scaling": 8.0,
    }
    return _tiny_llama(**{**multipliers, **overrides})


def _tiny_smollm3(**overrides: Any) -> dict[str, Any]:
    """Layer 1 of 2 is a NoPE layer (SmolLM3 drops RoPE on every 4th; 2 layers need it named)."""
    return _tiny_llama(**{"no_rope_layers": [1, 0], "tie_word_embeddings": True, **overrides})


def _tiny_stablelm(**overrides: Any) -> dict[str, Any]:
    """StableLM 2 12B's shape of attention: partial rotary, per-head q/k LayerNorm, q/k/v
    biases and the parallel residual."""
    extra = {
        "partial_rotary_factor": 0.25,
        "qk_layernorm": True,
        "use_parallel_residual": True,
        "use_qkv_bias": True,
    }
    return _tiny_llama(**{**extra, **overrides})


def _tiny_phi(**overrides: Any) -> dict[str, Any]:
    return _tiny_llama(
        **{"num_key_value_heads": 4, "partial_rotary_factor": 0.5, "resid_pdrop": 0.0, **overrides}
    )


def _tiny_gpt_neox(**overrides: Any) -> dict[str, Any]:
    base = _tiny_llama(**{"rotary_pct": 0.25, "use_parallel_residual": True, **overrides})
    base.pop("num_key_value_heads", None)
    return base


def _tiny_mixtral(**overrides: Any) -> dict[str, Any]:
    return _tiny_llama(
        **{"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, **overrides}
    )


def _tiny_qwen2_moe(**overrides: Any) -> dict[str, Any]:
    """Every layer sparse, with Qwen2-MoE's gated shared expert."""
    moe = {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 1,
        "use_sliding_window": False,
    }
    return _tiny_llama(**{**moe, **overrides})


def _tiny_qwen3_moe(**overrides: Any) -> dict[str, Any]:
    moe = {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "head_dim": 16,
        "use_sliding_window": False,
    }
    return _tiny_llama(**{**moe, **overrides})


_LLAMA_LIKE = {
    "layers_key": "num_hidden_layers",
    "heads_key": "num_attention_heads",
    "kv_heads_key": "num_key_value_heads",
    "hidden_key": "hidden_size",
    "vocab_key": "vocab_size",
    "max_positions_key": "max_position_embeddings",
    "embed_tokens": "model.embed_tokens",
    "attention_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_modules": ("gate_proj", "up_proj", "down_proj"),
    "feedforward_modules": ("down_proj",),
}
_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
_MOE = {**_LLAMA_LIKE, "mlp_modules": (), "feedforward_modules": (), "expert_parameters": _EXPERTS}
"""Mixtral / Qwen3-MoE: the MLP is only fused experts; linear targets are the attention's."""

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", **_LLAMA_LIKE, tiny_config=_tiny_llama),
        ArchSpec("mistral", **_LLAMA_LIKE, tiny_config=_tiny_llama),
        ArchSpec("qwen2", **_LLAMA_LIKE, tiny_config=_tiny_qwen2),
        ArchSpec("qwen3", **_LLAMA_LIKE, tiny_config=_tiny_qwen3),
        ArchSpec("olmo2", **_LLAMA_LIKE, tiny_config=_tiny_llama),
        ArchSpec("granite", **_LLAMA_LIKE, tiny_config=_tiny_granite),
        ArchSpec("smollm3", **_LLAMA_LIKE, tiny_config=_tiny_smollm3),
        ArchSpec("stablelm", **_LLAMA_LIKE, tiny_config=_tiny_stablelm),
        ArchSpec(
            "phi",
            **{
                **_LLAMA_LIKE,
                "attention_modules": ("q_proj", "k_proj", "v_proj", "dense"),
                "mlp_modules": ("fc1", "fc2"),
                "feedforward_modules": ("fc2",),
            },
            tiny_config=_tiny_phi,
        ),
        ArchSpec(
            "gpt_neox",
            **{
                **_LLAMA_LIKE,
                "kv_heads_key": None,
                "embed_tokens": "gpt_neox.embed_in",
                "attention_modules": ("query_key_value", "attention.dense"),
                "mlp_modules": ("dense_h_to_4h", "dense_4h_to_h"),
                "feedforward_modules": ("dense_4h_to_h",),
            },
            tiny_config=_tiny_gpt_neox,
        ),
        ArchSpec("mixtral", **_MOE, tiny_config=_tiny_mixtral),
        ArchSpec(
            "qwen2_moe",
            **{
                **_MOE,
                "mlp_modules": (
                    "shared_expert.gate_proj",
                    "shared_expert.up_proj",
                    "shared_expert.down_proj",
                ),
                "feedforward_modules": ("shared_expert.down_proj",),
            },
            tiny_config=_tiny_qwen2_moe,
        ),
        ArchSpec("qwen3_moe", **_MOE, tiny_config=_tiny_qwen3_moe),
        ArchSpec(
            "gpt2",
            layers_key="n_layer",
            heads_key="n_head",
            kv_heads_key=None,
            hidden_key="n_embd",
            vocab_key="vocab_size",
            max_positions_key="n_positions",
            embed_tokens="transformer.wte",
            attention_modules=("c_attn", "attn.c_proj"),
            mlp_modules=("c_fc", "mlp.c_proj"),
            feedforward_modules=("mlp.c_proj",),
            conv1d_weights=True,
            learned_positions=True,
            tiny_config=_tiny_gpt2,
        ),
    )
}


def get_arch(model_type: str) -> ArchSpec:
    """The spec of an HF `model_type`; an unknown one is refused with the supported list."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ExportError(
            f"model_type {model_type!r} is not supported (supported: {supported}); "
            "add an ArchSpec for it in models/architectures.py"
        )
    return spec
