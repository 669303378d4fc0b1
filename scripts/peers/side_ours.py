"""peft-export's side: a bundle through `peft_export.runtime.load_bundle(...).generate(...)`.

Loaded the way scripts/bench_generate.py and bench_adapters.py time our runtime: ORT's
defaults of OrtOptions (denormals flushed via session.set_denormal_as_zero, weights moved to
huge pages after loading), `threads` intra-op threads. Runtime-mode bundles get the adapter
by name on every request; merged bundles have it folded in (adapter None).
"""

from __future__ import annotations

import time

import onnxruntime

from peft_export import __version__
from peft_export.runtime import load_bundle


class Runner:
    def __init__(self, config: dict) -> None:
        self.bundle = load_bundle(
            config["bundle"], threads=config["threads"], denormals_as_zero=True
        )
        self.adapter = config.get("adapter")

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        stamps: list[float] = []
        result = self.bundle.generate(
            [prompt_ids],
            adapters=[self.adapter],
            max_new_tokens=tokens,
            ignore_eos=True,
            stream=lambda _event: stamps.append(time.perf_counter()),
        )
        return result.token_ids[0], stamps

    def info(self) -> dict:
        manifest = self.bundle.manifest
        quantization = getattr(manifest, "quantization", None)
        return {
            "peft_export": __version__,
            "onnxruntime": onnxruntime.__version__,
            "mode": manifest.mode,
            "precision": manifest.precision,
            "quantization": None
            if quantization is None
            else {
                key: getattr(quantization, key, None)
                for key in ("bits", "block_size", "format", "accuracy_level")
            },
            "denormals": "ONNX Runtime session.set_denormal_as_zero=1 (OrtOptions default)",
            "huge_pages": "weights collapsed onto 2 MiB pages after load (OrtOptions default)",
        }


def load(config: dict) -> Runner:
    return Runner(config)
