"""OpenVINO GenAI's side: an optimum-intel IR, the PEFT LoRA applied at runtime.

`ov_genai.Adapter` reads the PEFT safetensors as they are; PEFT's scale (lora_alpha / r) is
not in that file, so it is passed as the adapter's alpha. MODE_DYNAMIC keeps the adapter a
runtime input (not fused into the weights). Denormals: the CPU plugin's
CPU_DENORMALS_OPTIMIZATION=YES. fp32 sides also pin fp32 inference and KV cache precision
(the CPU plugin may otherwise pick bf16 / u8); quantized sides keep the plugin's defaults.
"""

from __future__ import annotations

import time

import numpy as np
import openvino as ov
import openvino_genai as ov_genai


class Runner:
    def __init__(self, config: dict) -> None:
        adapter = ov_genai.Adapter(config["adapter_file"])
        adapters = ov_genai.AdapterConfig(
            adapter, config["alpha"], ov_genai.AdapterConfig.Mode.MODE_DYNAMIC
        )
        self.properties = {
            "INFERENCE_NUM_THREADS": config["threads"],
            "CPU_DENORMALS_OPTIMIZATION": "YES",
            **config.get("properties", {}),
        }
        self.pipe = ov_genai.LLMPipeline(
            config["model_dir"], "CPU", adapters=adapters, **self.properties
        )

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        ids = np.array([prompt_ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        config = self.pipe.get_generation_config()
        config.max_new_tokens = tokens
        config.ignore_eos = True
        config.do_sample = False
        stamps: list[float] = []

        class Stamps(ov_genai.StreamerBase):
            def write(self, token):
                count = len(token) if isinstance(token, list) else 1
                stamps.extend([time.perf_counter()] * count)
                return ov_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        result = self.pipe.generate(inputs, config, streamer=Stamps())
        return list(result.tokens[0]), stamps

    def info(self) -> dict:
        core = ov.Core()
        return {
            "openvino_genai": ov_genai.__version__,
            "openvino": ov.__version__,
            "properties": {k: str(v) for k, v in self.properties.items()},
            "cpu_default_inference_precision": str(
                core.get_property("CPU", "INFERENCE_PRECISION_HINT")
            ),
            "denormals": "CPU_DENORMALS_OPTIMIZATION=YES (plugin setting)",
        }


def load(config: dict) -> Runner:
    return Runner(config)
