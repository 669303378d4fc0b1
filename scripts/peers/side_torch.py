"""The reference side: PyTorch + PEFT, the LoRA unmerged, a greedy loop over the KV cache.

Its 64 greedy ids define "correct" for every fp32 side. A plain argmax loop (not
`generate`) so it continues past EOS exactly like the other sides' ignore-EOS settings. The
tokenizer is loaded with the model and decodes the ids after the last token, as every side's.
"""

from __future__ import annotations

import time

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class Runner:
    def __init__(self, config: dict) -> None:
        torch.set_num_threads(config["threads"])
        torch.set_flush_denormal(True)
        base = AutoModelForCausalLM.from_pretrained(config["checkpoint"], dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, config["adapter"]).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(config["checkpoint"])
        self.text = ""

    def generate(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        ids: list[int] = []
        stamps: list[float] = []
        with torch.inference_mode():
            step = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            while True:
                ids.append(int(step.logits[0, -1].argmax()))
                stamps.append(time.perf_counter())
                if len(ids) == tokens:
                    self.text = self.tokenizer.decode(ids)
                    return ids, stamps
                step = self.model(
                    input_ids=torch.tensor([[ids[-1]]]),
                    past_key_values=step.past_key_values,
                    use_cache=True,
                )

    def info(self) -> dict:
        return {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "denormals": "torch.set_flush_denormal(True)",
            "attention": self.model.config._attn_implementation,
        }


def load(config: dict) -> Runner:
    return Runner(config)
