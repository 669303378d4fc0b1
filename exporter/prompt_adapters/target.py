"""What a prompt-side adapter must fit: the base's shapes and the bundle's length bounds.

Built from a manifest (`adapters add`) or from the base config (export), so conversion is
checked against the same numbers in both paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peft_export.bundle.manifest import Manifest
from peft_export.models.architectures import get_arch


@dataclass(frozen=True)
class PromptTarget:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    weights_sha256: str
    prefix_max_len: int = 0
    prompt_max_len: int = 0
    adaption_max_len: int = 0

    @classmethod
    def from_config(
        cls,
        config: Any,
        weights_sha256: str,
        *,
        prefix_max_len: int = 0,
        prompt_max_len: int = 0,
        adaption_max_len: int = 0,
    ) -> PromptTarget:
        """`config`: the HF config (object or dict) of the base model."""
        model_type = config["model_type"] if isinstance(config, dict) else config.model_type
        spec = get_arch(model_type)
        return cls(
            architecture=model_type,
            num_layers=spec.num_layers(config),
            num_heads=spec.num_heads(config),
            num_kv_heads=spec.num_kv_heads(config),
            head_dim=spec.head_dim(config),
            hidden_size=spec.hidden_size(config),
            weights_sha256=weights_sha256,
            prefix_max_len=prefix_max_len,
            prompt_max_len=prompt_max_len,
            adaption_max_len=adaption_max_len,
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PromptTarget:
        layout = manifest.adapters
        return cls.from_config(
            manifest.base_model.config,
            manifest.base_model.weights_sha256,
            prefix_max_len=layout.prefix_max_len,
            prompt_max_len=layout.prompt_max_len,
            adaption_max_len=layout.adaption_max_len,
        )
