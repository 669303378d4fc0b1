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
class BottleneckAttach:
    """Where one location of a bottleneck adapter (AdapterHub `adapters`) sits in a layer.

    Paths hold `{layer}`. The adapter reads the sublayer output h (the output of `output`) and
    the residual r (positional input `residual_arg` of `residual`), and replaces h; the block
    then adds r itself (pre-LN decoders) or normalises h + r with `norm` (post-LN encoders).
    """

    output: str
    residual: str
    saved: str
    """Key prefix of this location in the library's saved weights (`adapter.safetensors`)."""
    residual_arg: int = 0
    norm: str | None = None
    """Post-LN families: the norm the block applies to h + r (the library's `layer_norm`)."""


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
    bottleneck: Mapping[str, BottleneckAttach] | None = field(default=None, compare=False)
    """Bottleneck-adapter attachment per library location key; None: not supported."""
    tiny_config: Callable[..., dict[str, Any]] = field(default=dict, compare=False)
    """Config kwargs of a tiny random model for tests (overridable by keyword)."""
    sliding_window_key: str | None = None
    """Config field with the sliding-window size of windowed layers (those named
    "sliding_attention" in `config.layer_types`, or every layer when the config has no
    layer_types). Set, the graph measures the window in kept tokens from `attention_mask`
    (exporter/graph/window_mask.py), so a left-padded or prefixed row attends as it would alone;
    HF's own mask measures it in cache columns, which padding shifts."""
    known_as: str = ""
    """Models users know this family by (README's support table, scripts/support_table.py)."""
    features: tuple[str, ...] = ()
    """What its graph handles beyond a Llama block, as the support table lists it."""
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

    def sliding_window(self, config: Any) -> int | None:
        """The window of windowed layers; None when the family or this config has none."""
        if self.sliding_window_key is None:
            return None
        value = _get(config, self.sliding_window_key, None)
        return int(value) if value else None

    def layer_kinds(self, config: Any) -> tuple[str, ...]:
        """Each layer's attention kind as HF names it ("full_attention", "sliding_attention")."""
        kinds = _get(config, "layer_types", None)
        if kinds:
            return tuple(kinds)[: self.num_layers(config)]
        kind = "sliding_attention" if self.sliding_window(config) else "full_attention"
        return (kind,) * self.num_layers(config)


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


def _tiny_gemma(**overrides: Any) -> dict[str, Any]:
    """Gemma's own defaults are 256-wide heads; 16 keeps the model tiny."""
    return _tiny_llama(**{"head_dim": 16, "tie_word_embeddings": True, **overrides})


def _tiny_gemma2(**overrides: Any) -> dict[str, Any]:
    """Layers alternate sliding (window 5) / full. Soft caps low enough that tanh bends the
    tiny model's logits and attention scores (Gemma 2's real caps are 30 and 50)."""
    return _tiny_gemma(
        **{
            "sliding_window": 5,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 0.5,
            "attn_logit_softcapping": 0.05,
            **overrides,
        }
    )


def _tiny_gemma3_text(**overrides: Any) -> dict[str, Any]:
    """Layer 0 sliding (window 5, local rope base), layer 1 full (global rope base)."""
    return _tiny_gemma(
        **{
            "sliding_window": 5,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            **overrides,
        }
    )


def _tiny_phi3(**overrides: Any) -> dict[str, Any]:
    """Every layer slides (Phi-3-mini-4k's 2047, here 6); fused qkv_proj and gate_up_proj."""
    return _tiny_llama(
        **{
            "sliding_window": 6,
            "original_max_position_embeddings": 256,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
            **overrides,
        }
    )


def tiny_longrope(rotary_dim: int = 16, original: int = 16, maximum: int = 256) -> dict[str, Any]:
    """Phi-3.5 / Phi-4-mini style rope_parameters ("longrope") for a tiny Phi-3: short and long
    per-frequency factors, long ones used once a row's positions pass `original`.
    `rotary_dim` is head_dim times partial_rotary_factor (Phi-4-mini rotates 3/4 of a head)."""
    half = rotary_dim // 2
    return {
        "max_position_embeddings": maximum,
        "original_max_position_embeddings": original,
        "rope_parameters": {
            "rope_type": "longrope",
            "factor": maximum / original,
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.9 * i for i in range(half)],
            "original_max_position_embeddings": original,
        },
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

_LLAMA_BOTTLENECK = {
    "mh_adapter": BottleneckAttach(
        output="model.layers.{layer}.self_attn.o_proj",
        residual="model.layers.{layer}.input_layernorm",
        saved="model.layers.{layer}.attention_adapters",
    ),
    "output_adapter": BottleneckAttach(
        output="model.layers.{layer}.mlp",
        residual="model.layers.{layer}.post_attention_layernorm",
        saved="model.layers.{layer}.output_adapters",
    ),
}

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec(
            "llama",
            **_LLAMA_LIKE,
            bottleneck=_LLAMA_BOTTLENECK,
            tiny_config=_tiny_llama,
            known_as="Llama 2 / 3.x, SmolLM / SmolLM2, TinyLlama",
            features=("Llama 3 rope scaling", "bottleneck adapter sites"),
        ),
        ArchSpec(
            "mistral", **_LLAMA_LIKE, tiny_config=_tiny_llama, known_as="Mistral 7B, Mistral NeMo"
        ),
        ArchSpec("qwen2", **_LLAMA_LIKE, tiny_config=_tiny_qwen2, known_as="Qwen2 / Qwen2.5"),
        ArchSpec(
            "qwen3",
            **_LLAMA_LIKE,
            tiny_config=_tiny_qwen3,
            known_as="Qwen3",
            features=("q/k norms",),
        ),
        ArchSpec(
            "olmo2",
            **_LLAMA_LIKE,
            tiny_config=_tiny_llama,
            known_as="OLMo 2",
            features=("q/k norms over the projections", "post-norm blocks"),
        ),
        ArchSpec(
            "granite",
            **_LLAMA_LIKE,
            tiny_config=_tiny_granite,
            known_as="Granite 3.x",
            features=("embedding / residual / attention / logit multipliers",),
        ),
        ArchSpec(
            "smollm3",
            **_LLAMA_LIKE,
            tiny_config=_tiny_smollm3,
            known_as="SmolLM3",
            features=("NoPE layers",),
        ),
        ArchSpec(
            "stablelm",
            **_LLAMA_LIKE,
            tiny_config=_tiny_stablelm,
            known_as="StableLM 2",
            features=("partial rotary", "per-head q/k LayerNorm", "parallel residual"),
        ),
        ArchSpec(
            "phi",
            **{
                **_LLAMA_LIKE,
                "attention_modules": ("q_proj", "k_proj", "v_proj", "dense"),
                "mlp_modules": ("fc1", "fc2"),
                "feedforward_modules": ("fc2",),
            },
            tiny_config=_tiny_phi,
            known_as="Phi-1.5 / Phi-2",
            features=("partial rotary", "parallel attention + MLP"),
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
            known_as="Pythia, GPT-NeoX",
            features=("fused query_key_value", "partial rotary", "parallel residual"),
        ),
        ArchSpec(
            "mixtral",
            **_MOE,
            tiny_config=_tiny_mixtral,
            known_as="Mixtral 8x7B",
            features=("experts traced dense", "LoRA on fused experts: merged only"),
        ),
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
            known_as="Qwen1.5-MoE, Qwen2-MoE",
            features=(
                "experts traced dense",
                "shared expert",
                "LoRA on fused experts: merged only",
            ),
        ),
        ArchSpec(
            "qwen3_moe",
            **_MOE,
            tiny_config=_tiny_qwen3_moe,
            known_as="Qwen3 MoE",
            features=("experts traced dense", "LoRA on fused experts: merged only"),
        ),
        ArchSpec(
            "gemma",
            **_LLAMA_LIKE,
            tiny_config=_tiny_gemma,
            known_as="Gemma 2B / 7B, CodeGemma",
            features=("token embeddings scaled by sqrt(hidden); prompt-tuning vectors unscaled",),
        ),
        ArchSpec(
            "gemma2",
            **_LLAMA_LIKE,
            tiny_config=_tiny_gemma2,
            sliding_window_key="sliding_window",
            known_as="Gemma 2 2B / 9B / 27B",
            features=("final-logit and attention soft-capping", "scaled token embeddings"),
        ),
        ArchSpec(
            "gemma3_text",
            **_LLAMA_LIKE,
            tiny_config=_tiny_gemma3_text,
            sliding_window_key="sliding_window",
            known_as="Gemma 3 1B (text), Gemma 3 language models",
            features=("q/k norms", "local / global rope bases", "scaled token embeddings"),
        ),
        ArchSpec(
            "phi3",
            **{
                **_LLAMA_LIKE,
                "attention_modules": ("qkv_proj", "o_proj"),
                "mlp_modules": ("gate_up_proj", "down_proj"),
            },
            tiny_config=_tiny_phi3,
            sliding_window_key="sliding_window",
            known_as="Phi-3 / Phi-3.5 mini, Phi-4-mini",
            features=(
                "fused qkv_proj / gate_up_proj (LoRA targets them whole)",
                "LongRoPE, short/long factors chosen per row",
            ),
        ),
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
            known_as="GPT-2, DistilGPT2",
            features=("Conv1D weights", "learned positions"),
        ),
    )
}


def get_arch(model_type: str) -> ArchSpec:
    """The spec of an HF `model_type`; an unknown one is refused with the supported list."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        from peft_export.models.encoders import ENCODERS  # its specs extend ArchSpec

        spec = ENCODERS.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ExportError(
            f"model_type {model_type!r} is not supported (supported: {supported}); "
            "add an ArchSpec for it in models/architectures.py"
        )
    return spec
