"""Adapters added over HTTP: the torch-free converter (runtime/serving/peft_convert.py) writes
the same tensors as `peft-export adapters add` (PEFT's own layers) for LoRA, rsLoRA with rank
and alpha patterns, DoRA, IA3, prefix and prompt tuning, CPT; POST /v1/adapters installs one into a
running server, whose answers then equal Bundle.generate on the updated bundle; DELETE removes
it."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from serving_helpers import serve_process, serving_bundle
from tiny import make_adapter, tiny_model

from peft_export.bundle.manifest import load_manifest
from peft_export.bundle.safetensors_io import read_tensors
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.serving.peft_convert import convert_folder

EXPORTED = {"fr": ("lora", {}), "pre": ("prefix_tuning", {"num_virtual_tokens": 4})}
EXPORTED["pt"] = ("prompt_tuning", {"num_virtual_tokens": 3})
NEW = {
    "rs": ("rslora", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 16}}),
    "lo": ("lora", {"r": 3, "lora_alpha": 5}),
    "do": ("dora", {}),
    "ia": ("ia3", {}),
    "pre2": ("prefix_tuning", {"num_virtual_tokens": 3}),
    "pt2": ("prompt_tuning", {"num_virtual_tokens": 2}),
    "cpt": ("cpt", {"cpt_token_ids": [40, 41, 42], "cpt_tokens_type_mask": [1, 2, 4]}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-adapters")
    bundle = serving_bundle(tmp, EXPORTED)
    base = tiny_model("llama", seed=0)
    root = tmp / "new"
    for i, (name, (method, extra)) in enumerate(NEW.items()):
        make_adapter(base, method, root, name=name, seed=40 + i, **extra)
    return bundle, root


@pytest.mark.parametrize("name", list(NEW))
def test_numpy_conversion_equals_adapters_add(setup, tmp_path, name):
    from peft_export.exporter.commands.adapters import add

    bundle, root = setup
    reference = tmp_path / "reference"
    shutil.copytree(bundle, reference)
    add.callback(str(reference), (f"{name}={root / name}",), False, False, None)
    want = read_tensors(reference / "adapters" / f"{name}.safetensors")
    out = tmp_path / "ours.safetensors"
    method = convert_folder(bundle, load_manifest(bundle), name, root / name, out)
    got = read_tensors(out)
    assert method == load_manifest(reference).adapters.installed[name].method
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_refusals_name_the_fix(setup, tmp_path):
    bundle, _ = setup
    base = tiny_model("llama", seed=0)
    loha = make_adapter(base, "loha", tmp_path, name="loha")
    with pytest.raises(InferenceError, match="adapters add"):
        convert_folder(bundle, load_manifest(bundle), "x", loha, tmp_path / "x.safetensors")
    wide = make_adapter(base, "lora", tmp_path, name="wide", r=8)
    with pytest.raises(InferenceError, match="--max-rank 8"):
        convert_folder(bundle, load_manifest(bundle), "x", wide, tmp_path / "x.safetensors")


def test_post_and_delete_adapters_on_a_running_server(setup, tmp_path):
    from peft_export.runtime import load_bundle

    bundle, root = setup
    live = tmp_path / "live"
    shutil.copytree(bundle, live)
    args = ["--threads", "1", "--adapter-root", str(root)]
    with serve_process(live, *args) as url:
        for name in ("rs", "pre2"):
            status, body = _call(url, "POST", "/v1/adapters", {"name": name, "path": name})
            assert status == 200, body
        status, body = _call(url, "POST", "/v1/adapters", {"name": "rs", "path": "rs"})
        assert status == 400 and "already" in body["error"]["message"]
        texts = {}
        for name in ("rs", "pre2"):
            request = {"model": name, "prompt": "hello", "max_tokens": 8, "temperature": 0}
            status, body = _call(url, "POST", "/v1/completions", request)
            assert status == 200, body
            texts[name] = body["choices"][0]["text"]
        status, _ = _call(url, "DELETE", "/v1/adapters/rs")
        assert status == 200
        request = {"model": "rs", "prompt": "hello", "max_tokens": 8}
        assert _call(url, "POST", "/v1/completions", request)[0] == 404
        assert _call(url, "DELETE", "/v1/adapters/rs")[0] == 404
    reloaded = load_bundle(live, threads=1)
    assert "rs" not in load_manifest(live).adapters.installed
    want = reloaded.generate("hello", adapters="pre2", max_new_tokens=8, chat_template=False)
    assert texts["pre2"] == want.texts[0]
    shutil.copytree(bundle, tmp_path / "check")
    from peft_export.exporter.commands.adapters import add

    add.callback(str(tmp_path / "check"), (f"rs={root / 'rs'}",), False, False, None)
    check = load_bundle(tmp_path / "check", threads=1)
    want = check.generate("hello", adapters="rs", max_new_tokens=8, chat_template=False)
    assert texts["rs"] == want.texts[0]


def _call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BLOCKED = """
import importlib.abc, sys
from pathlib import Path

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Blocker())
from peft_export.bundle.manifest import load_manifest
from peft_export.runtime.serving import app, engine, ray_app, settings
from peft_export.runtime.serving.peft_convert import convert_folder

bundle, folder, out = map(Path, sys.argv[1:])
print(convert_folder(bundle, load_manifest(bundle), "x", folder, out))
"""


def test_server_and_converter_import_without_torch(setup, tmp_path):
    import subprocess
    import sys

    bundle, root = setup
    out = tmp_path / "x.safetensors"
    args = [sys.executable, "-c", BLOCKED, str(bundle), str(root / "do"), str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dora" and out.is_file()
