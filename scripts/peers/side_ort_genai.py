"""onnxruntime-genai's side: a model-builder folder, the LoRA as a runtime `.onnx_adapter`.

Greedy by hand over its Generator (append_tokens runs the model, get_logits reads the last
logits): its own search stops at EOS and `min_length` would suppress EOS, while every side
here must continue past EOS as a plain argmax loop does; the argmax is ~0.1 ms of a step.
Denormals: session_options passes unknown keys on to ONNX Runtime as session config entries,
so `session.set_denormal_as_zero` works (checked with gdb: main and pool threads get FTZ/DAZ).
Telemetry is switched off before anything else. Its tokenizer (`og.Tokenizer`) is loaded with
the model and turns the ids into text after the last token, as for a user: every side's load
time includes the tokenizer it needs to answer with text.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime_genai as og

og.disable_telemetry_events()


class Runner:
    def __init__(self, config: dict) -> None:
        model_config = og.Config(config["model_dir"])
        model_config.clear_providers()  # CPU
        threads = config["threads"]
        options = {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "session.set_denormal_as_zero": "1",
        }
        model_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(model_config)
        self.adapters = og.Adapters(self.model)
        self.adapters.load(config["adapter_file"], "pirate")
        self.tokenizer = og.Tokenizer(self.model)
        self.text = ""

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + tokens)
        generator = og.Generator(self.model, params)
        generator.set_active_adapter(self.adapters, "pirate")
        generator.append_tokens(prompt_ids)
        ids: list[int] = []
        stamps: list[float] = []
        while True:
            ids.append(int(np.argmax(generator.get_logits()[0, -1])))
            stamps.append(time.perf_counter())
            if len(ids) == tokens:
                self.text = self.tokenizer.decode(np.array(ids, dtype=np.int32))
                return ids, stamps
            generator.append_tokens([ids[-1]])

    def info(self) -> dict:
        # From the package metadata: importing onnxruntime's Python binding would load a
        # second ONNX Runtime into this process and inflate its peak RSS.
        from importlib.metadata import version

        return {
            "onnxruntime_genai": og.__version__,
            "onnxruntime": version("onnxruntime"),
            "denormals": "ONNX Runtime session.set_denormal_as_zero=1 (genai_config "
            "session_options, overlaid at load)",
        }


def load(config: dict) -> Runner:
    return Runner(config)
