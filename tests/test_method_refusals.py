"""Every refusal the method registry gives (bundle/methods.py), as the one line users see.

A method no mode serves is refused when its folder is read (only its config is looked at); a
merged-only method in runtime mode and a runtime-only method in merged mode are refused by
export before the graph is traced.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny import make_adapter, tiny_model

from peft_export.bundle import methods
from peft_export.exporter.adapter_source import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from peft_export.exporter.errors import ExportError
from peft_export.exporter.merge import merge_adapter
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

REFUSED = [m for m in methods.METHODS if not m.served]
MERGED_ONLY = [m for m in methods.METHODS if m.merged and m.runtime is None]
RUNTIME_ONLY = [
    m for m in methods.METHODS if not m.merged and m.runtime is not None and m.peft_type is not None
]
"""PEFT methods (a bottleneck folder's merge refusal: tests/test_bottleneck_parity.py)."""


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.mark.parametrize("method", REFUSED, ids=lambda m: m.name)
def test_method_no_mode_serves_is_refused_on_read(tmp_path, method):
    folder = tmp_path / method.name
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": method.peft_type}))
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ExportError) as info:
        read_adapter(folder)
    assert _one_line(info) == f"adapter {folder} is {method.label}: {method.merge_refusal}"


@pytest.mark.parametrize("method", MERGED_ONLY, ids=lambda m: m.name)
def test_merged_only_method_is_refused_in_runtime_mode(tmp_path, base, method):
    adapter = make_adapter(base, method.name, tmp_path)
    with pytest.raises(ExportError) as info:
        export_bundle(
            InMemoryBase(base),
            [("a", adapter)],
            out=tmp_path / "bundle",
            mode="runtime",
            planners=[plan_lora_banks],
        )
    assert _one_line(info) == (
        f"adapter a is {method.label}: runtime mode refuses it: {method.runtime_refusal}"
    )
    assert method.runtime_refusal.endswith("export it with --mode merged")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("method", RUNTIME_ONLY, ids=lambda m: m.name)
def test_runtime_only_method_is_refused_in_merged_mode(tmp_path, base, method):
    adapter = make_adapter(base, method.name, tmp_path)
    with pytest.raises(ExportError) as info:
        export_bundle(InMemoryBase(base), [("a", adapter)], out=tmp_path / "bundle")
    assert _one_line(info) == f"adapter a is {method.name}: {method.merge_refusal}"
    assert not (tmp_path / "bundle").exists()


def test_missing_extra_package_is_named(tmp_path, base, monkeypatch):
    """PEFT's AdaMSS config imports scikit-learn (the `adamss` extra)."""
    adapter = make_adapter(base, "adamss", tmp_path)
    source = read_adapter(adapter, name="a", base=base)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ExportError) as info:
        merge_adapter(copy.deepcopy(base), source)
    message = _one_line(info)
    assert message.startswith("adapter a: PEFT needs a package to load adamss (")
    assert message.endswith("pip install 'peft-export[adamss]' installs AdaMSS's)")
