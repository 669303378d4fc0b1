"""Everything a server process (or a Ray Serve replica) needs to build itself, as plain data
so it pickles to Ray workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from peft_export.runtime.serving.engine import Engine, SchedulerEngine, ThreadEngine


@dataclass(frozen=True)
class ServeSettings:
    bundle: str
    engine: str = "scheduler"
    threads: int | None = None
    max_rows: int = 16
    max_queue: int = 256
    kv_pool_tokens: int = 8192
    step_token_budget: int = 512
    prefill_share: float = 0.75
    api_key: str | None = None
    adapter_root: str | None = None
    model_name: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None

    def build_engine(self) -> Engine:
        from peft_export.runtime import load_bundle
        from peft_export.runtime.scheduler import SchedulerConfig

        options = {"threads": self.threads} if self.threads else {}
        bundle = load_bundle(self.bundle, **options)
        if self.engine == "threads":
            return ThreadEngine(bundle, max_running=self.max_rows, max_queue=self.max_queue)
        config = SchedulerConfig(
            max_rows=self.max_rows,
            max_queue=self.max_queue,
            kv_pool_tokens=self.kv_pool_tokens,
            step_token_budget=self.step_token_budget,
            prefill_share=self.prefill_share,
        )
        return SchedulerEngine(bundle, config)

    def build_server(self, engine: Engine | None = None):
        from peft_export.runtime.serving.app import OpenAIServer, ServerConfig

        engine = engine or self.build_engine()
        config = ServerConfig(
            base_name=self.model_name or base_model_name(engine.bundle.manifest),
            api_key=self.api_key,
            adapter_root=Path(self.adapter_root) if self.adapter_root else None,
            max_body_bytes=self.max_body_bytes,
            max_prompt_tokens=self.max_prompt_tokens,
        )
        return OpenAIServer(engine, config)

    def build_app(self) -> FastAPI:
        return self.build_server().app


def base_model_name(manifest) -> str:
    """The `model` that means no adapter: the base model's folder or hub name, last part."""
    source = manifest.base_model.source.rstrip("/")
    return source.rsplit("/", 1)[-1] or "base"
