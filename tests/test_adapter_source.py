"""Adapter folder validation: method detection and every refusal, before anything is built."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny import METHODS, make_adapter, tiny_model

from peft_export.exporter.adapter_source import (
    PICKLE_FILE,
    WEIGHTS_FILE,
    check_name,
    parse_adapter_arg,
    read_adapter,
)
from peft_export.exporter.errors import ExportError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {method: make_adapter(llama, method, root) for method in METHODS}


def _copy(src, tmp_path, name="copy"):
    return shutil.copytree(src, tmp_path / name)


@pytest.mark.parametrize("method", METHODS)
def test_detects_method_and_checks_shapes(adapters, llama, method):
    source = read_adapter(adapters[method], base=llama)
    assert source.method == method
    assert source.name == method
    assert source.header.tensors
    assert source.prompt_side == (
        method in ("prefix_tuning", "prompt_tuning", "p_tuning", "adaption_prompt")
    )
    assert all(np.isfinite(t).all() for t in source.load_tensors().values())


def test_method_assertion_names_both(adapters):
    with pytest.raises(
        ExportError, match=r"is a rslora adapter but --method lora.*--method rslora"
    ):
        read_adapter(adapters["rslora"], method="lora")
    with pytest.raises(ExportError, match="unknown method 'qlora'"):
        read_adapter(adapters["lora"], method="qlora")
    assert read_adapter(adapters["dora"], method="dora").method == "dora"


@pytest.mark.parametrize(
    ("overrides", "method"),
    [
        *(({"hidden_size": 32, "intermediate_size": 64}, m) for m in METHODS),
        ({"num_key_value_heads": 4}, "lora"),
        ({"num_key_value_heads": 4}, "prefix_tuning"),
        ({"intermediate_size": 96}, "ia3"),
        ({"intermediate_size": 96}, "lokr"),
    ],
)
def test_adapter_from_another_base_is_refused(adapters, overrides, method):
    other = tiny_model("llama", **overrides)
    with pytest.raises(ExportError, match="trained on another base model") as info:
        read_adapter(adapters[method], base=other)
    assert "\n" not in str(info.value)


def test_module_missing_from_base_is_refused(adapters):
    gpt2 = tiny_model("gpt2")
    with pytest.raises(
        ExportError, match=r"targets model\.layers\.0\..*which the base model lacks"
    ):
        read_adapter(adapters["lora"], base=gpt2)


def test_pickle_only_adapter_is_refused_with_the_convert_command(adapters, tmp_path):
    folder = _copy(adapters["lora"], tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    (folder / PICKLE_FILE).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ExportError, match="peft-export adapters convert-bin"):
        read_adapter(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("{oops"), "not valid JSON"),
        (lambda f: (f / "adapter_config.json").write_text("[1]"), "must hold a JSON object"),
        (lambda f: (f / WEIGHTS_FILE).unlink(), f"no {WEIGHTS_FILE}"),
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x05"), "truncated"),
        (
            lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:-10]),
            "points outside the file",
        ),
    ],
)
def test_broken_folders_are_refused(adapters, tmp_path, damage, message):
    folder = _copy(adapters["lora"], tmp_path)
    damage(folder)
    with pytest.raises(ExportError, match=message):
        read_adapter(folder)


def test_nan_weights_are_refused(tmp_path, adapters):
    folder = _copy(adapters["ia3"], tmp_path)
    tensors = read_adapter(folder).load_tensors()
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(ExportError, match="NaN or Inf"):
        read_adapter(folder)


def test_unsupported_peft_type_lists_supported(adapters, tmp_path):
    folder = _copy(adapters["lora"], tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "NOT_A_PEFT_TYPE"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="'NOT_A_PEFT_TYPE' is not supported.*lora, rslora"):
        read_adapter(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(ExportError, match="not a folder"):
        read_adapter(tmp_path / "missing")


def test_names(tmp_path):
    assert parse_adapter_arg("fr=./lora-fr") == ("fr", "./lora-fr")
    assert parse_adapter_arg("./lora-fr") == (None, "./lora-fr")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_adapter_arg(str(odd)) == (None, str(odd))
    assert check_name("fr_v2.1") == "fr_v2.1"
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ExportError, match="not usable as a file name"):
            check_name(bad)


@pytest.mark.parametrize("name", ["base", "Base", "_base_targets", "_adaption_base", "_x"])
def test_names_the_bundle_uses_are_reserved(name):
    """An adapter file named like these would replace the refit base set or a side file."""
    with pytest.raises(ExportError, match=f"adapter name '{name}' is reserved"):
        check_name(name)


def test_no_adapter_spelling_is_not_an_adapter_name():
    from peft_export.bundle import names

    with pytest.raises(ExportError, match="not usable as a file name"):
        check_name(names.NO_ADAPTER)
    assert check_name("based") == "based" and check_name("base_v2") == "base_v2"
