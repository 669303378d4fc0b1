"""CPT (context-aware prompt tuning) through the `prompt_embeds` input, against PEFT's forward.

PEFT saves a CPT adapter's virtual tokens as `prompt_embeddings`: the word embeddings of its
cpt_token_ids plus its trained delta after the epsilon projection, which is what its loaded
forward prepends (the loaded delta is zero). The adapter here has a delta on every token and
a type mask over every epsilon class, so a conversion that dropped the delta or the projection
fails. Rows run through the Python runtime: prefill, then greedy decode through the cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from prompt_helpers import check_row, peft_model, run_rows
from safetensors.numpy import load_file
from tiny import REGISTRY_CONFIGS, make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.bundle_adapters import add_prompt_adapter
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.session import load_bundle

PROMPT = [5, 17, 33, 80, 120, 9, 44]
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpt")
    base = tiny_model("llama")
    adapters = {
        "cpt": make_adapter(base, "cpt", tmp / "adapters", name="cpt"),
        "lora": make_adapter(base, "lora", tmp / "adapters", name="lora", seed=2),
        "pt": make_adapter(base, "prompt_tuning", tmp / "adapters", name="pt", seed=3),
    }
    return tmp, base, adapters


def _export(tmp, base, adapters, names, out) -> None:
    export_bundle(
        InMemoryBase(base, save_tiny_tokenizer(tmp / "tokenizer")),
        [(name, adapters[name]) for name in names],
        out=tmp / out,
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"prompt_max_len": 6},
    )


def test_adapter_has_a_projected_delta(setup) -> None:
    """The saved prompt is not the plain token embeddings: the delta is there, clamped."""
    _, base, adapters = setup
    saved = load_file(str(adapters["cpt"] / "adapter_model.safetensors"))["prompt_embeddings"]
    ids = REGISTRY_CONFIGS["cpt"]["cpt_token_ids"]
    words = base.get_input_embeddings().weight.detach().numpy()[ids]
    norms = np.linalg.norm(saved - words, axis=1)
    epsilon = 0.1 * np.sqrt(64 / 2048)  # PEFT's opt_projection_epsilon, scaled by token_dim
    assert np.allclose(norms[:4], epsilon, rtol=1e-4), norms  # format / input tokens
    assert np.all(norms[4:] < 1e-6), norms  # label and untyped tokens: epsilon 1e-10


def test_cpt_matches_peft_and_mixes_with_lora_and_base(setup) -> None:
    tmp, base, adapters = setup
    _export(tmp, base, adapters, ["cpt", "lora"], "bundle")
    manifest = load_manifest(tmp / "bundle")
    assert "cpt" in manifest.adapters.methods
    assert manifest.adapters.installed["cpt"].method == "cpt"
    bundle = load_bundle(tmp / "bundle")
    (alone,) = run_rows(bundle, [PROMPT], ["cpt"], n=STEPS)
    check_row(alone, peft_model(base, adapters["cpt"]), PROMPT)
    rows = [("cpt", PROMPT[2:]), ("lora", PROMPT), (None, PROMPT[:4])]
    mixed = run_rows(bundle, [ids for _, ids in rows], [name for name, _ in rows], n=STEPS)
    for (name, ids), run in zip(rows, mixed, strict=True):
        check_row(run, peft_model(base, adapters[name]) if name else base, ids)


def test_adapters_add_cpt_to_a_prompt_tuning_bundle(setup) -> None:
    """A prompt-tuning bundle whose manifest predates CPT takes one by `adapters add`."""
    tmp, base, adapters = setup
    _export(tmp, base, adapters, ["pt"], "pt_bundle")
    path = tmp / "pt_bundle" / names.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["adapters"]["methods"].remove("cpt")
    path.write_text(json.dumps(manifest))
    add_prompt_adapter(tmp / "pt_bundle", "added", adapters["cpt"])
    manifest = load_manifest(tmp / "pt_bundle")
    assert manifest.adapters.installed["added"].method == "cpt"
    assert "cpt" in manifest.adapters.methods
    bundle = load_bundle(tmp / "pt_bundle")
    runs = run_rows(bundle, [PROMPT, PROMPT[1:]], ["added", "pt"], n=STEPS)
    check_row(runs[0], peft_model(base, adapters["cpt"]), PROMPT)
    check_row(runs[1], peft_model(base, adapters["pt"]), PROMPT[1:])
