"""Text in and out: the bundle's tokenizer.json (via `tokenizers`) and its chat template.

No transformers: the template is rendered with jinja2 in a sandbox, with the helpers Hugging
Face templates expect (`raise_exception`, `tojson`, `strftime_now`, `bos_token`, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from peft_export.bundle.json_limits import load_json
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.runtime.errors import InferenceError


class TextCodec:
    """Tokenizes prompts (through the chat template when asked) and decodes tokens."""

    def __init__(self, tokenizer: Any, chat_template: str | None, special: dict[str, str]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = special

    @classmethod
    def from_bundle(cls, root: Path, manifest: Manifest) -> TextCodec | None:
        """The bundle's codec, or None when it ships no tokenizer (ids-only prompts)."""
        info = manifest.tokenizer
        if not info.file:
            return None
        path = confined(root, info.file)
        if not path.is_file():
            raise InferenceError(f"{path}: the bundle's tokenizer is missing; re-export the bundle")
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InferenceError(
                f"{path}: not a readable tokenizer.json ({exc}); re-export the bundle"
            ) from None
        return cls(tokenizer, info.chat_template, _special_tokens(root, manifest, tokenizer))

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, prompt: str, *, chat: bool, system: str | None = None) -> list[int]:
        """Ids of a user prompt: rendered as a chat turn when `chat` and a template exist."""
        if chat and self.chat_template:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            rendered = self.render_chat(messages)
            return self.encode_text(rendered, add_special_tokens=False)
        return self.encode_text(prompt)

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a conversation rendered through the chat template, ready for the reply."""
        if not self.chat_template:
            raise InferenceError(
                "chat messages need a chat template, which this bundle lacks; pass text instead"
            )
        return self.encode_text(self.render_chat(messages), add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            raise InferenceError("this bundle has no chat template; pass chat_template=False")
        template = _compile(self.chat_template)
        try:
            return template.render(messages=messages, add_generation_prompt=True, **self.special)
        except Exception as exc:
            raise InferenceError(
                f"the bundle's chat template failed to render ({exc}); "
                "pass chat_template=False (--no-chat-template) to send the raw prompt"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _special_tokens(root: Path, manifest: Manifest, tokenizer: Any) -> dict[str, str]:
    """Template variables bos_token/eos_token/...: from tokenizer_config.json, else the ids."""
    special: dict[str, str] = {}
    config_path = confined(root, "tokenizer_config.json")
    if config_path.is_file():
        config = load_json(
            config_path.read_bytes(), where=str(config_path), fix="re-export the bundle"
        )
        if not isinstance(config, dict):
            config = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
    info = manifest.tokenizer
    by_id = {"bos_token": info.bos_token_id, "pad_token": info.pad_token_id}
    if info.eos_token_ids:
        by_id["eos_token"] = info.eos_token_ids[0]
    for key, token_id in by_id.items():
        if key not in special and token_id is not None:
            token = tokenizer.id_to_token(token_id)
            if token is not None:
                special[key] = token
    return special


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InferenceError(
            "chat templates need jinja2; pip install jinja2, or pass chat_template=False"
        ) from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise InferenceError(
            f"the bundle's chat template does not parse ({exc}); "
            "pass chat_template=False (--no-chat-template) to send the raw prompt"
        ) from None
