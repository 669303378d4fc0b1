"""Tiny seeded models, tokenizer and PEFT adapters shared by every test.

Models are random but deterministic (seeded), small enough to export in seconds, and the
adapters have non-trivial weights (LoRA B random, DoRA magnitude and IA3 vectors perturbed),
so a test that forgets to apply an adapter fails.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from peft_export.models.architectures import get_arch

ARCHS = ("llama", "qwen2", "gpt2")
MERGEABLE_METHODS = ("lora", "rslora", "dora", "adalora", "loha", "lokr", "ia3")
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning", "adaption_prompt")
METHODS = MERGEABLE_METHODS + PROMPT_METHODS
REGISTRY_CONFIGS: dict[str, dict[str, Any]] = {
    "vera": {"r": 8},
    "pvera": {"r": 8},
    "randlora": {"r": 8},
    "vblora": {"r": 4, "vector_length": 16, "num_vectors": 32},
    "road": {"group_size": 16},
    "shira": {"r": 2},
    "c3a": {"block_size": 16},
    "waveft": {"n_frequency": 200},
    "hra": {"r": 4},
    "adamss": {"r": 8, "num_subspaces": 2},
    "trainable_tokens": {"token_indices": [5, 6, 7], "target_modules": None},
    "ln_tuning": {"task_type": "CAUSAL_LM", "target_modules": None},
    "cartridge": {"task_type": "CAUSAL_LM", "num_virtual_tokens": 5, "num_frozen_tokens": 2},
    "cpt": {
        "task_type": "CAUSAL_LM",
        "cpt_token_ids": [40, 41, 42, 43, 44, 45],
        "cpt_tokens_type_mask": [1, 2, 2, 3, 4, 0],
    },
}
"""Config arguments for the other registry methods (bundle/methods.py): shapes the tiny
models allow (block sizes dividing 64), small ranks where the method has one; CPT's type
mask covers every epsilon class of its delta projection (format, input, label, none)."""

SPECIAL_TOKENS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_config(arch: str, **overrides: Any):
    """HF config of a tiny model (hidden 64, 2 layers, vocab 260; llama: 4 heads, 2 KV)."""
    kwargs = get_arch(arch).tiny_config(**overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded random fp32 causal LM in eval mode; biases are random too (qwen2 q/k/v)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def tiny_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: ids 4..259 are the 256 bytes, so any text round-trips."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    vocab = dict(SPECIAL_TOKENS)
    for i, ch in enumerate(byte_chars):
        vocab[ch] = len(SPECIAL_TOKENS) + i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tiny_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with a chat template) and the special map."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        **special,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return path


def save_tiny_base(arch: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """An HF model folder (config, safetensors weights, tokenizer) as `--base` accepts it."""
    path = Path(path)
    tiny_model(arch, seed=seed, **overrides).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def make_adapter(
    base: PreTrainedModel,
    method: str,
    tmp_path: str | Path,
    *,
    name: str | None = None,
    seed: int = 1,
    **overrides: Any,
) -> Path:
    """Save a PEFT adapter of `method` for `base` with non-trivial seeded weights.

    `base` is not modified. Overrides go to the PEFT config (e.g. r=4,
    prefix_projection=True, prompt_tuning_init="TEXT", encoder_reparameterization_type="LSTM",
    rank_pattern={...}, modules_to_save=["lm_head"]).
    """
    from peft import get_peft_model

    out = Path(tmp_path) / (name or method)
    config = peft_config(base, method, out, **overrides)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    _perturb(model, seed)
    model.save_pretrained(out)
    return out


def make_adapters(
    base: PreTrainedModel,
    table: Mapping[str, tuple[str, dict[str, Any]]],
    tmp_path: str | Path,
    *,
    first_seed: int,
) -> dict[str, Path]:
    """`make_adapter` for each `name: (method, overrides)` of `table`, seeds counting up."""
    return {
        name: make_adapter(base, method, tmp_path, name=name, seed=first_seed + i, **overrides)
        for i, (name, (method, overrides)) in enumerate(table.items())
    }


def peft_config(base: PreTrainedModel, method: str, workdir: Path, **overrides: Any):
    """The PEFT config `make_adapter` uses: all linear targets, small ranks, inference off."""
    import peft

    spec = get_arch(base.config.model_type)
    targets = list(spec.target_modules)
    fan = spec.conv1d_weights
    lora = {"r": 4, "lora_alpha": 8, "target_modules": targets, "lora_dropout": 0.0}
    if method in ("lora", "rslora", "dora"):
        kwargs = {**lora, "fan_in_fan_out": fan}
        kwargs["use_rslora"] = method == "rslora"
        kwargs["use_dora"] = method == "dora"
        return peft.LoraConfig(**{**kwargs, **overrides})
    if method == "adalora":
        kwargs = {**lora, "init_r": 6, "target_r": 4, "total_step": 10, "fan_in_fan_out": fan}
        kwargs.pop("r")
        return peft.AdaLoraConfig(**{**kwargs, **overrides})
    if method == "loha":
        kwargs = {"r": 4, "alpha": 8, "target_modules": targets}
        return peft.LoHaConfig(**{**kwargs, **overrides})
    if method == "lokr":
        kwargs = {"r": 4, "alpha": 8, "target_modules": targets}
        return peft.LoKrConfig(**{**kwargs, **overrides})
    if method == "ia3":
        kwargs = {
            "target_modules": targets,
            "feedforward_modules": list(spec.feedforward_modules),
            "fan_in_fan_out": fan,
        }
        return peft.IA3Config(**{**kwargs, **overrides})
    task = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    if method == "prefix_tuning":
        kwargs = {**task, "prefix_projection": False, "encoder_hidden_size": 32}
        return peft.PrefixTuningConfig(**{**kwargs, **overrides})
    if method == "prompt_tuning":
        kwargs = {**task, **overrides}
        if str(kwargs.get("prompt_tuning_init", "RANDOM")).upper().endswith("TEXT"):
            kwargs.setdefault("prompt_tuning_init_text", "Answer like a pirate:")
            if "tokenizer_name_or_path" not in kwargs:
                tokenizer_dir = save_tiny_tokenizer(workdir.with_name(workdir.name + "-tokenizer"))
                kwargs["tokenizer_name_or_path"] = str(tokenizer_dir)
        return peft.PromptTuningConfig(**kwargs)
    if method == "p_tuning":
        kwargs = {**task, "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 32}
        return peft.PromptEncoderConfig(**{**kwargs, **overrides})
    if method == "trainable_tokens":
        kwargs = {
            "target_modules": [spec.embed_tokens.rpartition(".")[2]],
            "token_indices": [5, 6, 7],
        }
        return peft.TrainableTokensConfig(**{**kwargs, **overrides})
    if method == "adaption_prompt":
        kwargs = {"task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 2}
        return peft.AdaptionPromptConfig(**{**kwargs, **overrides})
    return _registry_config(method, targets, overrides)


def _registry_config(method: str, targets: list[str], overrides: Mapping[str, Any]):
    """PEFT's config class for a registry method, on every linear target by default."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    from peft_export.bundle.methods import get_method

    entry = get_method(method)
    if entry is None or entry.peft_type is None:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[entry.peft_type]]
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {"target_modules": targets} if "target_modules" in fields else {}
    kwargs.update(REGISTRY_CONFIGS.get(method, {}))
    kwargs.update(overrides)
    if kwargs.get("target_modules", 0) is None:
        del kwargs["target_modules"]
    return config_class(**kwargs)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable adapter tensor a seeded non-trivial value (PEFT inits many at 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
            if "modules_to_save" in name or "magnitude" in name or "ia3_l" in name:
                param.mul_(1.0 + 0.2 * noise) if param.abs().max() > 0 else param.add_(noise)
            elif "adaption_gate" in name:
                param.copy_(0.5 + 0.1 * noise)
            elif "prompt_embeddings" in name or "embedding" in name:
                param.add_(0.02 * noise)
            else:
                param.copy_(0.2 * noise)
