"""Merged mode: fold an adapter into the base weights with PEFT itself.

PEFT's own merge handles every method and variant it can load (the registry's `merged`
methods, bundle/methods.py: LoRA family, IA3, VeRA, OFT, ..., rank/alpha patterns, lora_bias,
fan_in_fan_out, modules_to_save), so reimplementing the algebra here would only add ways to
be wrong.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from peft_export.bundle.methods import get_method
from peft_export.exporter.adapter_source import AdapterSource, missing_package
from peft_export.exporter.errors import ExportError


def check_mergeable(source: AdapterSource) -> None:
    method = get_method(source.method)
    if method is None or not method.merged:
        reason = method.merge_refusal if method is not None else "it is not a known method"
        raise ExportError(f"adapter {source.name} is {source.method}: {reason}")
    if source.config.get("alora_invocation_tokens"):
        raise ExportError(
            f"adapter {source.name} is an activated LoRA (alora_invocation_tokens): its delta "
            "starts at its invocation tokens, which merged weights cannot express; export it "
            "with --mode runtime --alora"
        )


def merge_adapter(model: nn.Module, source: AdapterSource) -> nn.Module:
    """Return `model` with `source` merged into its weights (modifies `model` in place)."""
    check_mergeable(source)
    from peft import PeftModel

    resize_for_added_tokens(model, source)
    with _quiet():
        try:
            peft_model = PeftModel.from_pretrained(model, str(source.path), is_trainable=False)
        except ImportError as exc:
            raise missing_package(source, exc) from None
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, re.error) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ExportError(
                f"PEFT could not load adapter {source.name} onto this base "
                f"({type(exc).__name__}: {first:.200}); check its adapter_config.json and that "
                "it was trained on this base model"
            ) from exc
        _give_bias_to_bias_training_layers(peft_model)
        return merge_peft_model(peft_model, source.name)


def resize_for_added_tokens(model: nn.Module, source: AdapterSource) -> None:
    """Give the base the vocabulary an adapter that adds tokens was trained with, so PEFT can
    load it. The new rows' initial values do not matter: the adapter must bring every added
    token's embedding and head row (exporter/runtime_adapters/tokens.py checks the same)."""
    from peft_export.exporter.runtime_adapters.tokens import token_tensor_keys

    vocab = model.get_input_embeddings().weight.shape[0]
    wanted = vocab
    for key in token_tensor_keys(source):
        if not key.endswith("trainable_tokens_delta"):
            wanted = max(wanted, source.header.tensors[key].shape[0])
    for field in ("token_indices", "trainable_token_indices"):
        indices = source.config.get(field) or []
        lists = indices.values() if isinstance(indices, dict) else [indices]
        wanted = max([wanted, *(int(i) + 1 for found in lists for i in found)])
    if wanted > vocab:
        model.resize_token_embeddings(wanted, mean_resizing=False)


_BIAS_TRAINING = ("lora_bias", "beft_bias")
"""Adapter layer attributes (per-adapter dicts) that train a bias: LoRA's lora_bias, BEFT."""


def _give_bias_to_bias_training_layers(peft_model: nn.Module) -> None:
    """A zero bias lets PEFT merge a trained bias (`lora_bias`, BEFT) into layers that had
    none (e.g. Llama)."""
    for module in peft_model.modules():
        trained = [getattr(module, attr, None) for attr in _BIAS_TRAINING]
        base_layer = getattr(module, "base_layer", None)
        if not any(_trains_bias(t) for t in trained):
            continue
        if isinstance(base_layer, nn.Linear) and base_layer.bias is None:
            weight = base_layer.weight
            zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            base_layer.bias = nn.Parameter(zeros, requires_grad=False)


def _trains_bias(per_adapter: object) -> bool:
    """lora_bias maps adapters to flags, BEFT's beft_bias to the trained bias tensors."""
    values = per_adapter.values() if hasattr(per_adapter, "values") else ()
    return any(v is True or isinstance(v, torch.Tensor) for v in values)


def merge_peft_model(peft_model: nn.Module, name: str = "adapter") -> nn.Module:
    """merge_and_unload with NaN checking; refuses prompt-side PEFT models."""
    if getattr(peft_model, "peft_config", None) and any(
        cfg.is_prompt_learning or str(cfg.peft_type).endswith("ADAPTION_PROMPT")
        for cfg in peft_model.peft_config.values()
    ):
        raise ExportError(
            f"adapter {name} is a prompt-side method and cannot be merged; "
            "export it with --mode runtime"
        )
    with _quiet(), torch.no_grad():
        try:
            merged = peft_model.merge_and_unload(safe_merge=True)
        except (ValueError, RuntimeError) as exc:
            raise ExportError(
                f"merging adapter {name} failed ({str(exc).splitlines()[0]:.200}); "
                "export it with --mode runtime, or fix the adapter"
            ) from exc
    return merged.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFT warns about things that do not matter for inference (e.g. training flags)."""
    logger = logging.getLogger("peft")
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
