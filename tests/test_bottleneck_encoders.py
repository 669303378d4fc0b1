"""Bottleneck adapters (AdapterHub `adapters`) in encoder runtime bundles vs the library.

The library trains, saves and runs Houlsby, Pfeiffer, parallel and two residual variants on a
tiny BERT (Houlsby and Pfeiffer also on a tiny RoBERTa) in its own venv
(tests/adapters_venv.py, tests/bottleneck_reference.py); the bundles serve them from
bottleneck banks on the encoder graph, alone and in one batch with a PEFT LoRA row (its own
trained head) and a base row: sequence-classification logits and, from a feature-extraction
bundle of the same checkpoint, mean-pooled hidden states.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters_venv import run_in_venv
from cli_run import run_cli
from encoder_tiny import make_encoder_adapter, peft_outputs, save_tiny_encoder, tiny_tokenizer
from safetensors.torch import load_file, save_file

from peft_export.bundle import bottleneck as bn
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.encoders.export import export_encoder
from peft_export.exporter.encoders.verify import verify_encoder
from peft_export.exporter.errors import ExportError
from peft_export.runtime import load_bundle
from peft_export.runtime.encoder import Encoded

TOL = 1e-4
TASK = "sequence-classification"
REFERENCE_SCRIPT = "bottleneck_reference.py"
CONFIG = {
    "vocab_size": 160,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}
BERT_ADAPTERS = {
    # Houlsby: after attention and after the feed-forward block, swish
    "houlsby": {"class": "DoubleSeqBnConfig", "kwargs": {"reduction_factor": 8}},
    # Pfeiffer: after the feed-forward block, reads N = LayerNorm(h + r), its residual h, relu
    "pfeiffer": {"class": "SeqBnConfig", "kwargs": {"reduction_factor": 8}},
    "parallel": {"class": "ParBnConfig", "kwargs": {"reduction_factor": 8}},
    # its residual is N too; "post_add": its residual is h + r, per-channel scale
    "res_n": {
        "class": "SeqBnConfig",
        "kwargs": {"reduction_factor": 8, "residual_before_ln": False, "mh_adapter": True},
    },
    "post_add": {
        "class": "SeqBnConfig",
        "kwargs": {"reduction_factor": 4, "residual_before_ln": "post_add", "scaling": "channel"},
    },
}
FAMILIES = {
    "bert": ("Bert", BERT_ADAPTERS),
    "roberta": ("Roberta", {k: BERT_ADAPTERS[k] for k in ("houlsby", "pfeiffer")}),
}


def _family_job(family: str, tmp: Path, seed: int) -> tuple[Path, dict]:
    """A tiny seeded *ForSequenceClassification saved as a checkpoint folder, and its job."""
    import transformers

    prefix, adapters = FAMILIES[family]
    config = {**CONFIG, **({"type_vocab_size": 1} if family == "roberta" else {})}
    torch.manual_seed(seed)
    config_class = getattr(transformers, f"{prefix}Config")
    model = getattr(transformers, f"{prefix}ForSequenceClassification")(config_class(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("classifier."):  # a head that shows small hidden-state changes
                param.normal_(0.0, 0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    folder = tmp / f"{family}-base"
    model.eval().save_pretrained(folder)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    weights = tmp / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    ids = np.random.default_rng(seed).integers(5, 160, size=(3, 9))
    mask = np.ones_like(ids)
    ids[-1, -3:], mask[-1, -3:] = 0, 0  # a right-padded row, as the runtime pads
    job = {
        "config": config,
        "weights": str(weights),
        "adapters": {
            name: {"safetensors": True, **spec, "seed": 10 * seed + i}
            for i, (name, spec) in enumerate(adapters.items())
        },
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
    }
    return folder, job


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Base folders, the library's adapters (OUT/FAMILY/NAME) and its reference outputs."""
    tmp = tmp_path_factory.mktemp("bottleneck-encoders")
    job: dict = {"out": str(tmp / "library"), "encoders": {}}
    bases = {}
    for seed, family in enumerate(FAMILIES, start=5):
        bases[family], job["encoders"][family] = _family_job(family, tmp, seed)
    (tmp / "job.json").write_text(json.dumps(job))
    run_in_venv(Path(__file__).with_name(REFERENCE_SCRIPT), str(tmp / "job.json"))
    reference = dict(np.load(tmp / "library" / "reference.npz"))
    return bases, job["encoders"], reference, tmp


@pytest.fixture(scope="module")
def bert(library):
    """The BERT classification bundle: a PEFT LoRA (own head) and every library adapter."""
    bases, jobs, reference, tmp = library
    base = bases["bert"]
    lora = make_encoder_adapter(
        base, "bert", TASK, tmp / "lora", seed=3, target_modules=["query", "value"]
    )
    adapters = [("lora", lora), *((n, tmp / "library" / "bert" / n) for n in BERT_ADAPTERS)]
    export_encoder(base, adapters, out=tmp / "bert-cls", mode="runtime", options={"slots": 8})
    return load_bundle(tmp / "bert-cls", threads=1), _encoded(jobs["bert"]), reference, lora


def _encoded(job: dict, rows: list[int] | None = None) -> Encoded:
    ids = np.array(job["input_ids"], dtype=np.int64)
    mask = np.array(job["attention_mask"], dtype=np.int64)
    rows = list(range(len(ids))) if rows is None else rows
    return Encoded(ids[rows], mask[rows], np.zeros_like(ids[rows]), [None] * len(rows))


def _base_logits(base: Path, encoded: Encoded) -> np.ndarray:
    return peft_outputs(base, "bert", TASK, None, encoded)["logits"]


@pytest.mark.parametrize("name", list(BERT_ADAPTERS))
def test_bert_adapter_alone_equals_library_forward(library, bert, name):
    bases, _, _, _ = library
    bundle, encoded, reference, _ = bert
    want = reference[f"bert.{name}.logits"]
    change = np.abs(want - _base_logits(bases["bert"], encoded)).max()
    assert change > 100 * TOL, f"{name} barely changes the logits ({change:.2e}): a weak test"
    got = bundle.run(encoded, name)["logits"]
    assert np.abs(got[:, : want.shape[1]] - want).max() <= TOL, name
    assert bundle.labels(name) == ["LABEL_0", "LABEL_1"]


def test_bert_mixed_batch_with_lora_and_base_rows(library, bert):
    bundle, _, _, lora = bert
    _check_mixed_batch(library, bundle, lora)


def _check_mixed_batch(library, bundle, lora: Path) -> None:
    """A base row, the PEFT LoRA row and every library adapter in one batch, each row against
    its own reference (PEFT, or the library's forward)."""
    bases, jobs, reference, _ = library
    names = [None, "lora", *BERT_ADAPTERS]
    picks = [i % 3 for i in range(len(names))]
    got = bundle.run(_encoded(jobs["bert"], picks), names)["logits"]
    for row, (name, pick) in enumerate(zip(names, picks, strict=True)):
        one = _encoded(jobs["bert"], [pick])
        if name is None:
            want = _base_logits(bases["bert"], one)
        elif name == "lora":
            want = peft_outputs(bases["bert"], "bert", TASK, lora, one)["logits"]
        else:
            want = reference[f"bert.{name}.logits"][pick : pick + 1]
        assert np.abs(got[row : row + 1, : want.shape[1]] - want).max() <= TOL, f"row {row} {name}"


def test_bert_embeddings_bundle_equals_library_hidden_states(library, tmp_path):
    """Feature extraction: the bare BertModel (sites without the `bert.` prefix), bottleneck
    banks alone (no LoRA, no head banks), mean pooling over the mask, a base row too."""
    bases, jobs, reference, tmp = library
    folders = [(n, tmp / "library" / "bert" / n) for n in BERT_ADAPTERS]
    out = tmp_path / "bert-embed"
    manifest = export_encoder(
        bases["bert"], folders, out=out, mode="runtime", task="feature-extraction"
    )
    assert manifest.adapters.methods == [bn.METHOD]
    names = [*BERT_ADAPTERS, None]
    picks = [i % 3 for i in range(len(names))]
    encoded = _encoded(jobs["bert"], picks)
    got = load_bundle(out, threads=1).run(encoded, names)["embeddings"]
    mask = encoded.attention_mask[..., None].astype(np.float32)
    for row, (name, pick) in enumerate(zip(names, picks, strict=True)):
        if name is None:
            one = _encoded(jobs["bert"], [pick])
            want = peft_outputs(bases["bert"], "bert", "feature-extraction", None, one)
            want = want["embeddings"][0]
        else:
            hidden = reference[f"bert.{name}.hidden"][pick]
            want = (hidden * mask[row]).sum(0) / mask[row].sum()
        assert np.abs(got[row] - want).max() <= TOL, f"row {row} {name}"


def test_roberta_mixed_batch_equals_library_forward(library, tmp_path):
    bases, jobs, reference, tmp = library
    names = [*FAMILIES["roberta"][1]]
    out = tmp_path / "roberta-cls"
    export_encoder(
        bases["roberta"],
        [(n, tmp / "library" / "roberta" / n) for n in names],
        out=out,
        mode="runtime",
    )
    rows = [*names, None]
    encoded = _encoded(jobs["roberta"], [0, 2, 1])
    got = load_bundle(out, threads=1).run(encoded, rows)["logits"]
    for row, (name, pick) in enumerate(zip(rows, [0, 2, 1], strict=True)):
        if name is None:
            one = _encoded(jobs["roberta"], [pick])
            want = peft_outputs(bases["roberta"], "roberta", TASK, None, one)["logits"][0]
        else:
            want = reference[f"roberta.{name}.logits"][pick]
        assert np.abs(got[row] - want).max() <= TOL, f"row {row} {name}"


def test_adapter_added_after_export_brings_its_head(library, bert):
    """`peft-export adapters add` on an encoder bundle: converted against the manifest, the
    head the library saved beside it in its head-bank slot, mixed with exported adapters."""
    _, _, _, tmp = library
    bundle, encoded, reference, _ = bert
    folder = tmp / "library" / "bert" / "pfeiffer"
    assert (folder / "model_head.safetensors").is_file()
    assert run_cli("adapters", "add", str(bundle.root), f"late={folder}") == 0
    installed = load_manifest(bundle.root).adapters.installed["late"]
    assert installed.method == bn.METHOD
    again = load_bundle(bundle.root, threads=1)
    got = again.run(encoded, ["late", "houlsby", "late"])["logits"]
    want = reference["bert.pfeiffer.logits"]
    assert np.abs(got[[0, 2], :2] - want[[0, 2]]).max() <= TOL
    assert np.abs(got[1, :2] - reference["bert.houlsby.logits"][1]).max() <= TOL
    assert again.labels("late") == ["LABEL_0", "LABEL_1"]


def test_library_head_that_does_not_fit_is_refused(library, tmp_path):
    bases, _, _, tmp = library
    folder = shutil.copytree(tmp / "library" / "bert" / "houlsby", tmp_path / "flex")
    head = load_file(folder / "model_head.safetensors")
    save_file({f"heads.h.{k}": v for k, v in head.items()}, folder / "model_head.safetensors")
    with pytest.raises(ExportError, match=r"flexible head \(heads\.h\..*with_head=False"):
        export_encoder(bases["bert"], [("flex", folder)], out=tmp_path / "b", mode="runtime")
    assert not (tmp_path / "b").exists()


def test_merged_mode_refuses_a_bottleneck_adapter(library, tmp_path):
    bases, _, _, tmp = library
    with pytest.raises(ExportError, match="non-linear.*--mode runtime"):
        export_encoder(
            bases["bert"], [("h", tmp / "library" / "bert" / "houlsby")], out=tmp_path / "m"
        )


def test_family_without_bottleneck_sites_is_refused(library, tmp_path):
    _, _, _, tmp = library
    base = save_tiny_encoder("distilbert", TASK, tmp_path / "distil")
    with pytest.raises(ExportError, match="not supported on distilbert.*bert, roberta"):
        export_encoder(
            base, [("h", tmp / "library" / "bert" / "houlsby")], out=tmp_path / "b", mode="runtime"
        )
    assert not (tmp_path / "b").exists()


def test_verify_checks_lora_and_names_bottleneck_adapters_it_cannot_reference(bert):
    """`peft-export verify`: PEFT is no reference for library adapters, so they are listed as
    not verified (their rows still join the mixed-batch check) instead of failing or passing."""
    bundle, _, _, _ = bert
    assert run_cli("verify", str(bundle.root)) == 0
    report = json.loads((bundle.root / "reports" / "parity.json").read_text())
    assert [r["adapter"] for r in report["adapters"]] == [None, "lora"]
    assert set(BERT_ADAPTERS) <= set(report["not_verified"])
    assert report["mixed_batch"]["identical"] and report["passed"]
    with pytest.raises(ExportError, match="houlsby: a bottleneck adapter's reference"):
        verify_encoder(bundle.root, load_manifest(bundle.root), adapters=["houlsby"])


def test_fused_bundle_keeps_every_adapter_exact(library, bert, tmp_path):
    """--ort-fusions cpu (SkipLayerNormalization / Attention fusions) around bottleneck sites."""
    bases, _, _, tmp = library
    _, _, _, lora = bert
    adapters = [("lora", lora), *((n, tmp / "library" / "bert" / n) for n in BERT_ADAPTERS)]
    export_encoder(
        bases["bert"],
        adapters,
        out=tmp_path / "fused",
        mode="runtime",
        options={"slots": 8, "ort_fusions": "cpu"},
    )
    _check_mixed_batch(library, load_bundle(tmp_path / "fused", threads=1), lora)
