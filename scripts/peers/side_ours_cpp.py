"""peft-export's C++ runtime (runtime/cpp) on the same bundle as the Python side, through its
C ABI (include/peft_export/c_api.h) with ctypes: one call per request, the decoding loop and
every step in C++.

Options as the Python side's defaults: ONNX Runtime, `threads` intra-op threads, denormals
flushed (session.set_denormal_as_zero), session weights on huge pages. The C ABI returns the
runtime's own prefill and decode timers, not a time per token: the stamps this side hands the
worker put token 1 at the end of the prefill and token N at the end of the decode, spread
evenly between (only the first and last enter decode tokens/s).
"""

from __future__ import annotations

import ctypes
import json
import time


class Runner:
    def __init__(self, config: dict) -> None:
        lib = ctypes.CDLL(config["library"])
        lib.peft_export_open.restype = ctypes.c_void_p
        lib.peft_export_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.peft_export_generate.restype = ctypes.c_void_p
        lib.peft_export_generate.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.peft_export_last_error.restype = ctypes.c_char_p
        lib.peft_export_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.options = {"threads": config["threads"], "denormals_as_zero": True}
        self.handle = lib.peft_export_open(
            config["bundle"].encode(), json.dumps(self.options).encode()
        )
        if not self.handle:
            raise RuntimeError(lib.peft_export_last_error().decode())
        self.adapter = config.get("adapter")

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        row = {"prompt_ids": prompt_ids, "max_new_tokens": tokens, "ignore_eos": True}
        if self.adapter:
            row["adapter"] = self.adapter
        call = time.perf_counter()
        pointer = self.lib.peft_export_generate(self.handle, json.dumps({"rows": [row]}).encode())
        if not pointer:
            raise RuntimeError(self.lib.peft_export_last_error().decode())
        try:
            result = json.loads(ctypes.string_at(pointer).decode())
        finally:
            self.lib.peft_export_free(pointer)
        ids = result["rows"][0]["token_ids"]
        first = call + result["prefill_seconds"]
        step = result["decode_seconds"] / max(len(ids) - 1, 1)
        return ids, [first + i * step for i in range(len(ids))]

    def info(self) -> dict:
        # Read from the package metadata: importing onnxruntime's Python binding would load
        # a second ONNX Runtime (and numpy) into this process and add ~37 MB to its peak RSS.
        from importlib.metadata import version

        return {
            "runtime": "peft-export C++ runtime (runtime/cpp) through its C ABI",
            "onnxruntime": version("onnxruntime"),
            "options": self.options,
            "timing": "the C++ runtime's own prefill / decode timers",
        }


def load(config: dict) -> Runner:
    return Runner(config)
