"""The manifest parser accepts what the writer produces and refuses the rest with BundleError."""

from __future__ import annotations

import contextlib
import json

import pytest
from bundle_fixtures import manifest_dict, sample_manifest, write_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_export.bundle import BundleError, Manifest, load_manifest
from peft_export.bundle.manifest import SCHEMA_VERSION


def test_round_trip(tmp_path):
    manifest = sample_manifest()
    write_bundle(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.adapters.module("model.layers.0.self_attn.q_proj").in_features == 8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "upgrade peft-export"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d.update(mode="fused"), "manifest.mode"),
        (lambda d: d.pop("graph"), "manifest.graph is missing"),
        (lambda d: d["kv"].update(num_layers=-1), "must not be negative"),
        (lambda d: d["kv"].update(num_layers="2"), "manifest.kv.num_layers"),
        (lambda d: d["graph"].update(file="../model.onnx"), "escapes the bundle"),
        (lambda d: d["graph"].update(file="/etc/passwd"), "escapes the bundle"),
        (
            lambda d: d["adapters"].update(installed={"x": {"file": "../x", "method": "lora"}}),
            "escapes the bundle",
        ),
        (lambda d: d["adapters"].update(modules="all"), "must be a list"),
    ],
)
def test_rejections(tmp_path, mutate, message):
    data = manifest_dict()
    mutate(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        load_manifest(tmp_path)


def test_not_json_and_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_manifest_symlink_escape(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(sample_manifest().to_json())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_manifest(bundle)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**12)
    | st.floats(allow_subnormal=False)  # ORT sessions elsewhere in the worker set FTZ
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*prefix, index))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_raise_only_bundle_error(data):
    """Any mutation either still parses or fails with BundleError: no other exception."""
    doc = manifest_dict()
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete"]))
            if action == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    with contextlib.suppress(BundleError):
        Manifest.from_dict(doc)
