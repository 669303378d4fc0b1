"""llama.cpp's side, through llama-cpp-python's C bindings (no Python-side sampling loop
beyond one call per token): a GGUF base, the LoRA GGUF applied at runtime
(llama_adapter_lora_init + llama_set_adapters_lora), llama.cpp's own greedy sampler.

The KV cache is f32 on the F32 side (fp32 end to end, like the other fp32 sides) and
llama.cpp's default (f16) on quantized sides. ggml has no setting for denormals: the worker
sets FTZ/DAZ in the main thread before the context (and its threads) exist.
"""

from __future__ import annotations

import ctypes
import time

import llama_cpp as llama


class Runner:
    def __init__(self, config: dict) -> None:
        llama.llama_backend_init()
        model_params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(config["model"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {config['model']}")
        params = llama.llama_context_default_params()
        params.n_ctx = config["n_ctx"]
        params.n_batch = params.n_ubatch = config["n_ctx"]
        params.n_threads = params.n_threads_batch = config["threads"]
        params.no_perf = True
        if config.get("kv_f32"):
            params.type_k = params.type_v = llama.GGML_TYPE_F32
        self.kv = "f32" if config.get("kv_f32") else "default (f16)"
        self.ctx = llama.llama_init_from_model(self.model, params)
        self.adapter = llama.llama_adapter_lora_init(self.model, config["lora"].encode())
        if not self.adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA {config['lora']}")
        adapters = (llama.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llama.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
            raise RuntimeError("llama_set_adapters_lora failed")
        self.sampler = llama.llama_sampler_init_greedy()

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        llama.llama_memory_clear(llama.llama_get_memory(self.ctx), True)
        batch_tokens = (llama.llama_token * len(prompt_ids))(*prompt_ids)
        batch = llama.llama_batch_get_one(batch_tokens, len(prompt_ids))
        ids: list[int] = []
        stamps: list[float] = []
        while True:
            if llama.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            token = llama.llama_sampler_sample(self.sampler, self.ctx, -1)
            ids.append(int(token))
            stamps.append(time.perf_counter())
            if len(ids) == tokens:
                return ids, stamps
            batch_tokens = (llama.llama_token * 1)(token)
            batch = llama.llama_batch_get_one(batch_tokens, 1)

    def info(self) -> dict:
        from importlib.metadata import version

        return {
            "llama_cpp_python": version("llama-cpp-python"),
            "llama_cpp": "vendored in the llama-cpp-python sdist; build: setup_llama_cpp.sh",
            "kv_cache": self.kv,
            "lora_scale": 1.0,
            "denormals": "no runtime setting; FTZ/DAZ inherited from the worker's main thread",
        }


def load(config: dict) -> Runner:
    return Runner(config)
