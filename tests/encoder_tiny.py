"""Tiny seeded encoders, a WordPiece tokenizer and PEFT adapters with trained heads.

Heads are random (seeded) and LoRA B is random, so a test that drops an adapter's delta or
uses the wrong head fails. Each adapter folder holds `labels.json` (its id2label).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, PreTrainedModel

from peft_export.models.encoders import ENCODERS, TASKS

_TEXT = """the a an is was good bad great awful movie film food service slow fast cheap price
love hate this that it very not really team won lost match game vote law city river paris
london berlin where who what capital of france germany england in on and"""
WORDS = tuple(_TEXT.split())
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [
    "the movie was very good",
    "this food is awful and the service slow",
    "the team won the match",
    "paris is the capital of france",
    "i really hate that price",
    "berlin",
]


def tiny_tokenizer() -> Tokenizer:
    """BERT-style WordPiece over a small vocabulary; unknown pieces fall back to letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'")
    vocab_list = SPECIAL + list(WORDS) + letters + ["##" + ch for ch in letters]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    assert len(vocab) <= 160
    return tokenizer


def tiny_encoder(arch: str, task: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded random fp32 task model (biases random too), eval mode, eager attention."""
    import transformers

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **ENCODERS[arch].tiny_config(**overrides))
    auto = getattr(transformers, TASKS[task].auto_class)
    model = auto.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def save_tiny_encoder(arch: str, task: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    model = tiny_encoder(arch, task, seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    return path


def make_encoder_adapter(
    base_dir: Path,
    arch: str,
    task: str,
    out: Path,
    *,
    method: str = "lora",
    num_labels: int | None = None,
    labels: list[str] | None = None,
    seed: int = 1,
    **config: Any,
) -> Path:
    """A PEFT adapter for the saved base, with a random trained head of `num_labels` rows."""
    import peft
    import transformers

    torch.manual_seed(seed)
    auto = getattr(transformers, TASKS[task].auto_class)
    kwargs: dict[str, Any] = {"attn_implementation": "eager"}
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    base = auto.from_pretrained(base_dir, **kwargs)
    task_type = TASKS[task].peft_task_type
    targets = config.pop("target_modules", list(ENCODERS[arch].attention_modules[:2]))
    if method == "ia3":
        peft_config = peft.IA3Config(task_type=task_type, target_modules=targets, **config)
    elif method == "prompt_tuning":
        peft_config = peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=config.pop("num_virtual_tokens", 4)
        )
    else:
        peft_config = peft.LoraConfig(
            task_type=task_type,
            r=config.pop("r", 4),
            lora_alpha=config.pop("lora_alpha", 8),
            target_modules=targets,
            use_dora=method == "dora",
            **config,
        )
    model = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_B", "modules_to_save", "lora_magnitude", "prompt_")):
                param.add_(torch.randn_like(param) * 0.3)
            elif "ia3_l" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out)
    if labels is not None:
        (out / "labels.json").write_text(json.dumps(labels))
    return out


def peft_outputs(
    base_dir: Path,
    arch: str,
    task: str,
    adapter_dir: Path | None,
    encoded: Any,
    *,
    num_labels: int | None = None,
    pooling: str = "mean",
    normalize: bool = False,
) -> dict[str, Any]:
    """The PyTorch/PEFT reference for an encoded batch (runtime `Encoded`), as numpy.

    The model PEFT injected is called directly: PeftModelForQuestionAnswering (peft 0.21)
    drops `token_type_ids`, which the model itself uses. Prompt tuning runs through PEFT's
    wrapper (it adds the virtual tokens). Embeddings are pooled here, as sentence-transformers
    does."""
    import peft
    import transformers

    auto = getattr(transformers, TASKS[task].auto_class)
    kwargs: dict[str, Any] = {"attn_implementation": "eager"}
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    model = auto.from_pretrained(base_dir, **kwargs)
    if adapter_dir is not None:
        wrapped = peft.PeftModel.from_pretrained(model, adapter_dir)
        prompt = wrapped.peft_config["default"].is_prompt_learning
        model = wrapped if prompt else wrapped.get_base_model()
    feeds = {
        "input_ids": torch.tensor(encoded.input_ids),
        "attention_mask": torch.tensor(encoded.attention_mask),
    }
    if ENCODERS[arch].token_type_ids:
        feeds["token_type_ids"] = torch.tensor(encoded.token_type_ids)
    with torch.no_grad():
        out = model.eval()(**feeds)
    if task != "feature-extraction":
        return {name: getattr(out, name).numpy() for name in TASKS[task].outputs}
    hidden = out.last_hidden_state
    mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    return {"embeddings": pooled.numpy()}
