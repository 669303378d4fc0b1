"""Encoder (BERT-family) knowledge, in one place: tasks and per-family specs.

An `EncoderSpec` is an `ArchSpec` (so the LoRA-bank machinery reads it like a decoder's) plus
what an encoder export needs: whether the family takes `token_type_ids`, and the module of
each task model whose rows are the labels (the "label head"), which head banks pad to the
bundle's largest label count. Adding a family is one entry in `ENCODERS`; adding a task is
one entry in `TASKS` plus its label head in each family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft_export.exporter.errors import ExportError
from peft_export.models.architectures import ArchSpec, BottleneckAttach

SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
FEATURE_EXTRACTION = "feature-extraction"


@dataclass(frozen=True)
class TaskSpec:
    """One encoder task: the transformers Auto class, PEFT's task type and graph outputs."""

    name: str
    auto_class: str
    peft_task_type: str
    outputs: tuple[str, ...]
    labelled: bool
    """True when the graph's last dim holds labels (padded to the bundle's largest head)."""


TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        TaskSpec(
            SEQUENCE_CLASSIFICATION,
            "AutoModelForSequenceClassification",
            "SEQ_CLS",
            ("logits",),
            True,
        ),
        TaskSpec(
            TOKEN_CLASSIFICATION, "AutoModelForTokenClassification", "TOKEN_CLS", ("logits",), True
        ),
        TaskSpec(
            QUESTION_ANSWERING,
            "AutoModelForQuestionAnswering",
            "QUESTION_ANS",
            ("start_logits", "end_logits"),
            False,
        ),
        TaskSpec(FEATURE_EXTRACTION, "AutoModel", "FEATURE_EXTRACTION", ("embeddings",), False),
    )
}
PEFT_TASK_TYPES = {task.peft_task_type: task.name for task in TASKS.values()}


@dataclass(frozen=True)
class EncoderSpec(ArchSpec):
    """An encoder family: an ArchSpec plus token types and each task's label head."""

    token_type_ids: bool = False
    """The graph takes `token_type_ids` (segment ids: BERT's sentence pairs)."""
    label_heads: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Task name -> dotted path of the module whose output rows are the labels."""
    positions_after_padding: bool = False
    """Positions start after the pad id (RoBERTa): the position table is pad_token_id + 1
    rows longer than the longest input."""

    def label_head(self, task: str) -> str | None:
        return self.label_heads.get(task)

    def max_length(self, config: Any) -> int:
        """Longest input in tokens the position table allows."""
        length = self.max_positions(config)
        if self.positions_after_padding:
            length -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return length


def _tiny_bert(**overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 160,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 96,
        "pad_token_id": 0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **overrides,
    }


def _tiny_distilbert(**overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 160,
        "dim": 32,
        "hidden_dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_position_embeddings": 96,
        "pad_token_id": 0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "seq_classif_dropout": 0.0,
        **overrides,
    }


def _tiny_deberta_v2(**overrides: Any) -> dict[str, Any]:
    return _tiny_bert(
        **{
            "relative_attention": True,
            "position_buckets": 16,
            "max_relative_positions": 32,
            "pos_att_type": ["p2c", "c2p"],
            "pooler_hidden_size": 32,
            "pooler_dropout": 0.0,
            **overrides,
        }
    )


def _tiny_modernbert(**overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 160,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 96,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "cls_token_id": 2,
        "sep_token_id": 3,
        "global_attn_every_n_layers": 2,
        "local_attention": 16,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "mlp_dropout": 0.0,
        "classifier_dropout": 0.0,
        **overrides,
    }


_BERT_LIKE: dict[str, Any] = {
    "layers_key": "num_hidden_layers",
    "heads_key": "num_attention_heads",
    "kv_heads_key": None,
    "hidden_key": "hidden_size",
    "vocab_key": "vocab_size",
    "max_positions_key": "max_position_embeddings",
    "attention_modules": ("query", "key", "value", "attention.output.dense"),
    "mlp_modules": ("intermediate.dense", "output.dense"),
    "feedforward_modules": ("output.dense",),
}


def _post_ln_bottleneck(prefix: str) -> dict[str, BottleneckAttach]:
    """Bottleneck sites of BERT-style layers on the task models (`prefix`: the base model's
    attribute): BertSelfOutput / BertOutput (and RoBERTa's copies) compute
    LayerNorm(dropout(dense(x)) + input_tensor), and the `adapters` library runs its adapter on
    dense's output with that LayerNorm and residual, as the hooks here do."""
    return {
        location: BottleneckAttach(
            output=f"{prefix}.encoder.layer.{{layer}}.{block}.dense",
            residual=f"{prefix}.encoder.layer.{{layer}}.{block}",
            saved=f"encoder.layer.{{layer}}.{block}",
            residual_arg=1,
            norm=f"{prefix}.encoder.layer.{{layer}}.{block}.LayerNorm",
        )
        for location, block in (("mh_adapter", "attention.output"), ("output_adapter", "output"))
    }


_HEADS = {
    SEQUENCE_CLASSIFICATION: "classifier",
    TOKEN_CLASSIFICATION: "classifier",
    QUESTION_ANSWERING: "qa_outputs",
}

ENCODERS: dict[str, EncoderSpec] = {
    spec.model_type: spec
    for spec in (
        EncoderSpec(
            "bert",
            **_BERT_LIKE,
            embed_tokens="bert.embeddings.word_embeddings",
            token_type_ids=True,
            label_heads=_HEADS,
            bottleneck=_post_ln_bottleneck("bert"),
            tiny_config=_tiny_bert,
        ),
        EncoderSpec(
            "roberta",
            **_BERT_LIKE,
            embed_tokens="roberta.embeddings.word_embeddings",
            label_heads={**_HEADS, SEQUENCE_CLASSIFICATION: "classifier.out_proj"},
            positions_after_padding=True,
            bottleneck=_post_ln_bottleneck("roberta"),
            tiny_config=lambda **o: _tiny_bert(**{"type_vocab_size": 1, **o}),
        ),
        EncoderSpec(
            "xlm-roberta",
            **_BERT_LIKE,
            embed_tokens="roberta.embeddings.word_embeddings",
            label_heads={**_HEADS, SEQUENCE_CLASSIFICATION: "classifier.out_proj"},
            positions_after_padding=True,
            bottleneck=_post_ln_bottleneck("roberta"),
            tiny_config=lambda **o: _tiny_bert(**{"type_vocab_size": 1, **o}),
        ),
        EncoderSpec(
            "distilbert",
            layers_key="n_layers",
            heads_key="n_heads",
            kv_heads_key=None,
            hidden_key="dim",
            vocab_key="vocab_size",
            max_positions_key="max_position_embeddings",
            embed_tokens="distilbert.embeddings.word_embeddings",
            attention_modules=("q_lin", "k_lin", "v_lin", "out_lin"),
            mlp_modules=("lin1", "lin2"),
            feedforward_modules=("lin2",),
            label_heads=_HEADS,
            tiny_config=_tiny_distilbert,
        ),
        EncoderSpec(
            "deberta-v2",
            **{
                **_BERT_LIKE,
                "attention_modules": (
                    "query_proj",
                    "key_proj",
                    "value_proj",
                    "attention.output.dense",
                ),
            },
            embed_tokens="deberta.embeddings.word_embeddings",
            label_heads=_HEADS,
            tiny_config=_tiny_deberta_v2,
        ),
        EncoderSpec(
            "modernbert",
            **{
                **_BERT_LIKE,
                "attention_modules": ("Wqkv", "attn.Wo"),
                "mlp_modules": ("Wi", "mlp.Wo"),
                "feedforward_modules": ("mlp.Wo",),
            },
            embed_tokens="model.embeddings.tok_embeddings",
            label_heads=_HEADS,
            tiny_config=_tiny_modernbert,
        ),
    )
}


def is_encoder(model_type: str) -> bool:
    return model_type in ENCODERS


def get_encoder(model_type: str) -> EncoderSpec:
    spec = ENCODERS.get(model_type)
    if spec is None:
        raise ExportError(
            f"model_type {model_type!r} is not a supported encoder (supported: "
            f"{', '.join(sorted(ENCODERS))}); add an EncoderSpec in models/encoders.py"
        )
    return spec


def get_task(name: str) -> TaskSpec:
    task = TASKS.get(name)
    if task is None:
        raise ExportError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return task
