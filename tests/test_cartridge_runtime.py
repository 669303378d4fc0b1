"""Cartridge adapters as prefix KV runtime inputs, against PEFT's own Cartridge forward.

PEFT serves a Cartridge exactly as prefix tuning: `get_prompt` views its stored KV cache
(frozen tokens first, then the trained ones) as past key/values. One tiny Llama runtime
bundle takes a Cartridge with frozen tokens at export and another one without frozen tokens
by `peft-export adapters add`; each runs through the Python runtime (prefill, then greedy
decode through the KV cache) alone and in one batch with a LoRA row and a base row, every row
against PEFT's forward (fp32 logits <= 1e-4, greedy ids identical; tests/prompt_helpers.py).
"""

from __future__ import annotations

import pytest
from cli_run import run_cli
from prompt_helpers import check_row, peft_model, run_rows
from tiny import make_adapters, save_tiny_tokenizer, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.session import load_bundle

PROMPT = [5, 17, 33, 80, 120, 9, 44]
STEPS = 6
ADAPTERS = {
    "cart": ("cartridge", {}),
    "cart_added": ("cartridge", {"num_virtual_tokens": 3, "num_frozen_tokens": 0}),
    "lora": ("lora", {}),
}


class CartridgeBundle:
    def __init__(self, tmp) -> None:
        self.base = tiny_model("llama")
        self.dirs = make_adapters(self.base, ADAPTERS, tmp / "adapters", first_seed=60)
        self.path = tmp / "bundle"
        export_bundle(
            InMemoryBase(self.base, save_tiny_tokenizer(tmp / "tokenizer")),
            [("cart", self.dirs["cart"]), ("lora", self.dirs["lora"])],
            out=self.path,
            mode="runtime",
            planners=[plan_lora_banks, plan_prompt_inputs],
        )
        added = f"cart_added={self.dirs['cart_added']}"
        assert run_cli("adapters", "add", str(self.path), added) == 0
        self.bundle = load_bundle(self.path)
        self.models = {name: peft_model(self.base, path) for name, path in self.dirs.items()}

    def model(self, name: str | None):
        return self.base if name is None else self.models[name]


@pytest.fixture(scope="module")
def cart(tmp_path_factory) -> CartridgeBundle:
    return CartridgeBundle(tmp_path_factory.mktemp("cartridge"))


def test_reference_is_peft_cartridge_with_frozen_tokens(cart: CartridgeBundle) -> None:
    """The reference is PEFT's CartridgeEncoder, frozen tokens included in the served prefix."""
    from peft.tuners.cartridge.model import CartridgeEncoder

    encoder = cart.model("cart").prompt_encoder["default"]
    assert isinstance(encoder, CartridgeEncoder)
    assert (encoder.num_frozen_tokens, encoder.num_trainable_tokens) == (2, 3)
    layout = load_bundle(cart.path).manifest.adapters
    assert layout.prefix_max_len == 5
    assert layout.installed["cart"].method == "prefix_tuning"
    assert layout.installed["cart_added"].method == "prefix_tuning"


@pytest.mark.parametrize("name", ["cart", "cart_added"])
def test_cartridge_matches_peft_forward(cart: CartridgeBundle, name: str) -> None:
    (run,) = run_rows(cart.bundle, [PROMPT], [name], n=STEPS)
    check_row(run, cart.model(name), PROMPT)


def test_mixed_batch_with_lora_and_base_rows(cart: CartridgeBundle) -> None:
    rows = [("cart", PROMPT), ("lora", PROMPT[1:]), (None, PROMPT[:4]), ("cart_added", PROMPT[2:])]
    mixed = run_rows(cart.bundle, [ids for _, ids in rows], [name for name, _ in rows], n=STEPS)
    for (name, ids), run in zip(rows, mixed, strict=True):
        check_row(run, cart.model(name), ids)


def test_torch_free_converter_writes_the_exporters_tensors(cart: CartridgeBundle, tmp_path) -> None:
    """`POST /v1/adapters` converts without torch (runtime/serving/peft_convert.py): a Cartridge
    becomes the same prefix tensors `adapters add` installed."""
    import numpy as np

    from peft_export.bundle.safetensors_io import read_tensors
    from peft_export.runtime.serving.peft_convert import convert_folder

    manifest = cart.bundle.manifest
    out = tmp_path / "cart.safetensors"
    method = convert_folder(cart.path, manifest, "cart_added", cart.dirs["cart_added"], out)
    assert method == "prefix_tuning"
    installed = read_tensors(cart.path / manifest.adapters.installed["cart_added"].file)
    converted = read_tensors(out)
    assert set(converted) == set(installed)
    for key, value in installed.items():
        np.testing.assert_allclose(converted[key], value, rtol=0, atol=1e-6)


def test_a_bundle_without_prefix_inputs_names_them(cart: CartridgeBundle) -> None:
    """A Cartridge becomes prefix key/values: the refusal names those inputs and the option."""
    from peft_export.exporter.errors import ExportError
    from peft_export.exporter.prompt_adapters.convert import convert_prompt_adapter
    from peft_export.exporter.prompt_adapters.target import PromptTarget

    target = PromptTarget.from_config(cart.base.config, "sha")
    with pytest.raises(ExportError, match="needs prefix key/value inputs.*--prefix-max-len 3"):
        convert_prompt_adapter(cart.dirs["cart_added"], target)
