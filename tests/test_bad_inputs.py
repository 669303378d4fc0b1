"""Every row of docs/bad-inputs.md: one 'error:' line, exit 2, no traceback, nothing changed.

Each case builds its hostile input in its own folder (copies of two tiny bundles exported once
per module, PEFT folders made once), drives the CLI in-process (a few through a subprocess, as
users run it), and checks that every file of the work folder and of the shared fixtures hashes
the same afterwards and that no staging folder or file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.bundle.errors import PeftExportError
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.cli import main
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter, remove_adapter
from peft_export.runtime import InferenceError
from peft_export.runtime.adapter_store import AdapterStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
PEFT_WEIGHTS = "adapter_model.safetensors"
CLI = "import sys; from peft_export.exporter.cli import main; main(sys.argv[1:])"


@dataclass(frozen=True)
class Fixtures:
    root: Path
    base: Path
    adapters: Path
    merged: Path
    runtime: Path
    cache: Path


@dataclass
class Work:
    """One case's folder, with helpers that copy fixtures into it before damaging them."""

    fx: Fixtures
    dir: Path

    def bundle(self, kind: str = "runtime") -> Path:
        return shutil.copytree(getattr(self.fx, kind), self.dir / "bundle", symlinks=True)

    def adapter(self, name: str) -> Path:
        return shutil.copytree(self.fx.adapters / name, self.dir / name)

    def outside(self, path: Path) -> Path:
        """Move `path` out of the bundle and leave a symlink to it in its place."""
        moved = shutil.move(path, self.dir / f"outside-{path.name}")
        os.symlink(moved, path)
        return moved


@dataclass(frozen=True)
class Case:
    command: str
    input: str
    argv: Callable[[Work], list]
    message: str
    subprocess: bool = False


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    """A tiny llama HF folder, PEFT adapters, and merged + runtime bundles exported from it.

    runtime: q_proj/v_proj banks, r_max 4, methods lora, 3 slots, adapters fr, de, es.
    """
    root = tmp_path_factory.mktemp("bad-inputs")
    base = save_tiny_base("llama", root / "base")
    llama = tiny_model("llama")
    adapters = root / "adapters"
    qv = {"target_modules": ["q_proj", "v_proj"]}
    for seed, name in enumerate(("fr", "de", "es"), start=1):
        make_adapter(llama, "lora", adapters, name=name, seed=seed, **qv)
    make_adapter(llama, "lora", adapters, name="rank8", r=8, **qv)
    make_adapter(llama, "lora", adapters, name="mlp", target_modules=["gate_proj"])
    make_adapter(llama, "dora", adapters, name="dora", **qv)
    make_adapter(llama, "prefix_tuning", adapters, name="prefix")
    other = tiny_model("llama", num_key_value_heads=4)
    make_adapter(other, "lora", adapters, name="other", **qv)
    merged, runtime = root / "merged", root / "runtime"
    fr = f"fr={adapters / 'fr'}"
    assert _cli(["export", "--base", base, "--adapter", fr, "--out", merged]) == 0
    banks = ["--slots", "3", "--methods", "lora", "--target-modules", "q_proj,v_proj"]
    argv = ["export", "--base", base, "--adapter", fr, "--mode", "runtime", *banks]
    assert _cli([*argv, "--max-rank", "4", "--out", runtime]) == 0
    de, es = f"de={adapters / 'de'}", f"es={adapters / 'es'}"
    assert _cli(["adapters", "add", runtime, de, es]) == 0
    return Fixtures(root, base, adapters, merged, runtime, tmp_path_factory.mktemp("cache"))


def _cli(argv: list) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# -- damage helpers -------------------------------------------------------------------------


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_manifest(bundle: Path, change: Callable[[dict], None]) -> Path:
    _edit_json(bundle / "manifest.json", change)
    return bundle


def _rewrite_tensors(path: Path, change: Callable[[dict], None]) -> None:
    with safe_open(str(path), "numpy") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _poison(value: float, part: str) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        key = _first(tensors, part)
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = value

    return change


def _external_data(bundle: Path) -> Path:
    """Re-save the graph with its weights in model.onnx.data (as large models are)."""
    graph = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        graph, str(bundle / "model.onnx"), save_as_external_data=True, location="model.onnx.data"
    )
    return bundle / "model.onnx.data"


def _relocate_external_data(bundle: Path, location: str) -> None:
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(graph, str(bundle / "model.onnx"))


class _RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- the cases (one row of docs/bad-inputs.md each) ---------------------------------------


def _export(w: Work, *adapter: str, extra: tuple = ()) -> list:
    argv = ["export", "--base", w.fx.base, *extra, "--out", w.dir / "out" / "bundle"]
    for value in adapter:
        argv[3:3] = ["--adapter", value]
    return argv


def _export_damaged(damage: Callable[[Path], object], *extra: str) -> Callable[[Work], list]:
    def argv(w: Work) -> list:
        folder = w.adapter("fr")
        damage(folder)
        return _export(w, str(folder), extra=extra)

    return argv


def _run(bundle: Path, *extra: object) -> list:
    return ["run", bundle, "--prompt", "hi", "--max-new-tokens", "2", *extra]


def _run_damaged(damage: Callable[[Path], object], *extra: str, kind="runtime"):
    def argv(w: Work) -> list:
        bundle = w.bundle(kind)
        damage(bundle)
        return _run(bundle, *extra)

    return argv


def _add(adapter: str, name: str = "x", kind: str = "runtime", *extra: str):
    def argv(w: Work) -> list:
        return ["adapters", "add", w.bundle(kind), f"{name}={w.fx.adapters / adapter}", *extra]

    return argv


def _add_damaged(damage: Callable[[Path], object]) -> Callable[[Work], list]:
    def argv(w: Work) -> list:
        folder = w.adapter("de")
        damage(folder)
        return ["adapters", "add", w.bundle(), f"x={folder}"]

    return argv


def _config(folder: Path, **fields: object) -> None:
    _edit_json(folder / "adapter_config.json", lambda c: c.update(fields))


def _verify_pickled_source(w: Work) -> list:
    folder = w.adapter("fr")
    (folder / PEFT_WEIGHTS).rename(folder / "adapter_model.bin")
    return ["verify", w.bundle("merged"), "--source", f"fr={folder}"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_gguf(w: Work) -> list:
    (w.dir / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return ["export", "--base", w.dir / "model.gguf", "--out", w.dir / "out"]


def _not_gguf(w: Work) -> list:
    (w.dir / "model.gguf").write_text("hello " * 20)
    return ["export", "--base", w.dir / "model.gguf", "--out", w.dir / "out"]


def _base_without_config(w: Work) -> list:
    base = shutil.copytree(w.fx.base, w.dir / "base")
    (base / "config.json").unlink()
    return ["export", "--base", base, "--out", w.dir / "out"]


def _base_pickle_only(w: Work) -> list:
    base = shutil.copytree(w.fx.base, w.dir / "base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return ["export", "--base", base, "--out", w.dir / "out"]


def _malicious_pickle(w: Work) -> list:
    folder = w.adapter("fr")
    (folder / PEFT_WEIGHTS).unlink()
    payload = {"weight": _RunsCode(w.dir / "code-ran")}
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(payload))
    return ["adapters", "convert-bin", folder]


def _int_weights(folder: Path) -> None:
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    save_file(
        {k: (v * 100).astype(np.int64) for k, v in tensors.items()}, str(folder / PEFT_WEIGHTS)
    )


def _wrong_shape(folder: Path) -> None:
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    tensors[_first(tensors, "lora_A")] = np.zeros((4, 63), np.float32)
    save_file(tensors, str(folder / PEFT_WEIGHTS))


def _huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _oversized_tensor(path: Path) -> None:
    header = {"lora.x.A": {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 2**62]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


DEEP = 50_000
"""Nesting far past Python's recursion limit; the hypothesis fuzzers never build this."""


def _deep_json(levels: int = DEEP) -> str:
    return "[" * levels + "]" * levels


def _deep_header(path: Path) -> None:
    raw = ('{"lora.x.A": ' + _deep_json() + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _deep_manifest(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text().rstrip()
    (bundle / "manifest.json").write_text(text[:-1] + ', "deep": ' + _deep_json() + "}")


def _installed(bundle: Path, name: str = "fr") -> Path:
    return bundle / "adapters" / f"{name}.safetensors"


def _set(key: str, value: object, where: Callable[[dict], dict] = lambda m: m):
    return lambda bundle: _edit_manifest(bundle, lambda m: where(m).__setitem__(key, value))


def _installed_entry(name: str) -> Callable[[dict], dict]:
    return lambda m: m["adapters"]["installed"][name]


def _dotdot_external_data(w: Work) -> list:
    bundle = w.bundle("merged")
    shutil.move(_external_data(bundle), w.dir / "weights.data")
    _relocate_external_data(bundle, "../weights.data")
    return _run(bundle)


def _symlinked_external_data(w: Work) -> list:
    bundle = w.bundle("merged")
    w.outside(_external_data(bundle))
    return _run(bundle)


def _symlinked_adapters_dir_add(w: Work) -> list:
    bundle = w.bundle()
    w.outside(bundle / "adapters")
    return ["adapters", "add", bundle, f"x={w.fx.adapters / 'de'}"]


def _run_linked_out(relative: str, *extra: str) -> Callable[[Work], list]:
    def argv(w: Work) -> list:
        bundle = w.bundle()
        w.outside(bundle / relative)
        return _run(bundle, *extra)

    return argv


def _engine_record(file: str) -> dict:
    return {
        "file": file,
        "backend": "tensorrt",
        "version": "10",
        "precision": "fp32",
        "profiles": [],
    }


def _many_adapters(w: Work) -> list:
    prompts = [a for p in ("a", "b", "c") for a in ("--prompt", p)]
    adapters = [a for n in ("fr", "de", "es") for a in ("--adapter", n)]
    return ["run", w.bundle(), *prompts, *adapters, "--max-new-tokens", "2"]


def _engine_dotdot_build(w: Work) -> list:
    bundle = w.bundle("merged")
    shutil.move(_external_data(bundle), w.dir / "weights.data")
    _relocate_external_data(bundle, "../weights.data")
    ranges = ["--seq", "1:4:8", "--past", "0:8:16", "--no-engine-cache", "--quiet"]
    return ["build-engine", bundle, *ranges]


CASES: dict[str, Case] = {
    # export: the base model
    "base-missing": Case(
        "export",
        "--base path that does not exist",
        lambda w: ["export", "--base", w.dir / "nope" / "model", "--out", w.dir / "out"],
        "does not exist; pass an existing Hugging Face model folder",
    ),
    "base-no-config": Case(
        "export",
        "--base folder without config.json",
        _base_without_config,
        "has no config.json, so it is not a Hugging Face model folder",
    ),
    "base-pickle-only": Case(
        "export",
        "--base folder with only pytorch_model.bin",
        _base_pickle_only,
        "holds only pickled weights (pytorch_model.bin), which peft-export never unpickles",
    ),
    "gguf-corrupt": Case(
        "export",
        "--base file with a GGUF magic and garbage after it",
        _corrupt_gguf,
        "the file is corrupt, truncated or of an architecture transformers cannot load",
    ),
    "gguf-not-gguf": Case(
        "export",
        "--base model.gguf that is a text file",
        _not_gguf,
        "is a file but not a GGUF model (no GGUF header)",
    ),
    # export: options
    "unknown-method": Case(
        "export",
        "--method qlora",
        lambda w: _export(w, str(w.fx.adapters / "fr"), extra=("--method", "qlora")),
        "unknown method 'qlora'; choose one of: lora, rslora, dora",
    ),
    "method-mismatch": Case(
        "export",
        "a LoRA adapter with --method dora",
        lambda w: _export(w, str(w.fx.adapters / "fr"), extra=("--method", "dora")),
        "is a lora adapter but --method dora was given; pass --method lora or omit --method",
    ),
    "bad-mode": Case(
        "export",
        "--mode both",
        lambda w: _export(w, str(w.fx.adapters / "fr"), extra=("--mode", "both")),
        "Invalid value for '--mode': 'both' is not one of 'merged', 'runtime'",
    ),
    "bad-precision": Case(
        "export",
        "--precision int4",
        lambda w: _export(w, str(w.fx.adapters / "fr"), extra=("--precision", "int4")),
        "Invalid value for '--precision': 'int4' is not one of 'fp32', 'fp16', 'bf16'",
    ),
    "adapter-syntax": Case(
        "export",
        "--adapter 'fr=' (empty folder after NAME=)",
        lambda w: _export(w, "fr="),
        "--adapter 'fr=': write NAME=DIR with both parts, or just DIR",
    ),
    "adapter-bad-name": Case(
        "export",
        "--adapter 'my adapter=DIR' (space in the name)",
        lambda w: _export(w, f"my adapter={w.fx.adapters / 'fr'}"),
        "adapter name 'my adapter' is not usable as a file name",
    ),
    "duplicate-name": Case(
        "export",
        "--adapter a=DIR1 --adapter a=DIR2 --mode runtime",
        lambda w: _export(
            w,
            f"a={w.fx.adapters / 'fr'}",
            f"a={w.fx.adapters / 'de'}",
            extra=("--mode", "runtime"),
        ),
        "two adapters are named 'a'; name them apart with NAME=DIR",
    ),
    "export-reserved-name": Case(
        "export",
        "--adapter _base_targets=DIR --mode runtime (the DoRA base-targets file's name)",
        lambda w: _export(
            w,
            f"_base_targets={w.fx.adapters / 'fr'}",
            extra=("--mode", "runtime", "--methods", "lora,dora"),
        ),
        "adapter name '_base_targets' is reserved",
    ),
    "export-refit-base-name": Case(
        "export",
        "--adapter base=DIR (the name of the refit base set)",
        lambda w: _export(w, f"base={w.fx.adapters / 'fr'}"),
        "adapter name 'base' is reserved (the bundle's own files use 'base', '_base_targets'",
    ),
    "merged-two-adapters": Case(
        "export",
        "two adapters with --mode merged",
        lambda w: _export(w, str(w.fx.adapters / "fr"), str(w.fx.adapters / "de")),
        "merged mode folds one adapter into the weights, got 2",
    ),
    "prompt-side-merged": Case(
        "export",
        "a prefix-tuning adapter with --mode merged",
        lambda w: _export(w, str(w.fx.adapters / "prefix")),
        "--mode runtime",
    ),
    "out-exists": Case(
        "export",
        "--out that already exists, without --force",
        lambda w: ["export", "--base", w.fx.base, "--out", w.bundle("merged")],
        "already exists; choose another --out or pass --force",
    ),
    "out-is-file": Case(
        "export",
        "--out that is a file, with --force",
        lambda w: ["export", "--base", w.fx.base, "--out", w.fx.base / "config.json", "--force"],
        "exists and is not a folder; choose another --out",
    ),
    # export: the adapter folder
    "adapter-no-config": Case(
        "export",
        "adapter folder without adapter_config.json",
        _export_damaged(lambda f: (f / "adapter_config.json").unlink()),
        "no adapter_config.json; pass the folder PEFT's save_pretrained wrote",
    ),
    "adapter-config-corrupt": Case(
        "export",
        "adapter_config.json that is not JSON",
        _export_damaged(lambda f: (f / "adapter_config.json").write_text("{")),
        "not valid JSON",
    ),
    "adapter-config-oversized": Case(
        "export",
        "adapter_config.json of 17 MB",
        _export_damaged(lambda f: (f / "adapter_config.json").write_text(" " * (17 << 20))),
        "too large for an adapter config; re-save it with PEFT",
    ),
    "adapter-config-deep": Case(
        "export",
        "adapter_config.json nested 50,000 levels deep",
        _export_damaged(
            lambda f: (f / "adapter_config.json").write_text(
                '{"peft_type": "LORA", "r": ' + _deep_json() + "}"
            )
        ),
        "JSON nested 50001 levels deep (at most 64); re-save it with PEFT",
    ),
    "unknown-peft-type": Case(
        "export",
        "adapter_config.json with peft_type NOT_A_PEFT_TYPE",
        _export_damaged(
            lambda f: _edit_json(
                f / "adapter_config.json", lambda c: c.update(peft_type="NOT_A_PEFT_TYPE")
            )
        ),
        "PEFT type 'NOT_A_PEFT_TYPE' is not supported; supported methods: lora",
    ),
    "adapter-config-bad-pattern": Case(
        "export",
        'rank_pattern {"(": 2} (not a regular expression)',
        _export_damaged(lambda f: _config(f, rank_pattern={"(": 2})),
        "PEFT could not load adapter fr onto this base (error: missing ), unterminated subpattern",
    ),
    "pickle-only-adapter": Case(
        "export",
        "adapter folder with only adapter_model.bin",
        _export_damaged(
            lambda f: (f / PEFT_WEIGHTS).rename(f / "adapter_model.bin"),
        ),
        "which are never loaded; convert them once with 'peft-export adapters convert-bin",
    ),
    "adapter-corrupt": Case(
        "export",
        "adapter_model.safetensors of 12 bytes 0xff",
        _export_damaged(lambda f: (f / PEFT_WEIGHTS).write_bytes(b"\xff" * 12)),
        "safetensors header length 18446744073709551615 is invalid; the file is corrupt",
    ),
    "adapter-truncated": Case(
        "export",
        "adapter_model.safetensors cut in half",
        _export_damaged(lambda f: _truncate(f / PEFT_WEIGHTS)),
        "points outside the file (truncated?); the file is corrupt or not safetensors",
    ),
    "adapter-int-dtype": Case(
        "export",
        "adapter weights stored as int64",
        _export_damaged(_int_weights),
        "has dtype I64, adapter weights are F32/F16/BF16/F64; re-save the adapter with PEFT",
    ),
    "adapter-nan": Case(
        "export",
        "a NaN in lora_B",
        _export_damaged(lambda f: _rewrite_tensors(f / PEFT_WEIGHTS, _poison(np.nan, "lora_B"))),
        "contains NaN or Inf; fix the adapter",
    ),
    "adapter-wrong-shape": Case(
        "export",
        "lora_A of shape [4, 63] for a 64-wide layer",
        _export_damaged(_wrong_shape),
        "has shape [4, 63] but the base model needs [4, 64]",
    ),
    "adapter-other-base": Case(
        "export",
        "a LoRA trained on a base with 4 KV heads (this one has 2)",
        lambda w: _export(w, str(w.fx.adapters / "other")),
        "the adapter was trained on another base model: pass that base with --base",
    ),
    # adapters add / remove / convert-bin
    "add-rank-too-large": Case(
        "adapters add",
        "a rank-8 LoRA into banks of r_max 4",
        _add("rank8"),
        "has rank 8 (as lora) but the bundle's banks hold rank 4; re-export with --max-rank 8",
    ),
    "add-unknown-module": Case(
        "adapters add",
        "a LoRA on mlp.gate_proj into q_proj/v_proj banks",
        _add("mlp"),
        "which this bundle has no bank for; re-export with --target-modules covering it",
    ),
    "add-method-not-accepted": Case(
        "adapters add",
        "a DoRA adapter into a bundle exported with --methods lora (no out_scale inputs)",
        _add("dora"),
        "is dora and needs input lora.model.layers.0.self_attn.q_proj.out_scale, which this "
        "bundle's graph lacks; re-export with --methods including dora",
    ),
    "add-other-base": Case(
        "adapters add",
        "a LoRA trained on another base",
        _add("other"),
        "does not fit this bundle's base model (size mismatch for model.layers.0.self_attn.v_proj",
    ),
    "add-config-wrong-type": Case(
        "adapters add",
        'adapter_config.json with r "x"',
        _add_damaged(lambda f: _config(f, r="x")),
        "its adapter_config.json is not a valid lora config",
    ),
    "add-config-nan-alpha": Case(
        "adapters add",
        "adapter_config.json with lora_alpha NaN",
        _add_damaged(lambda f: _config(f, lora_alpha=float("nan"))),
        "converting it gives NaN or Inf in lora.model.layers.0.self_attn.q_proj.B",
    ),
    "add-duplicate-name": Case(
        "adapters add",
        "fr=DIR when fr is installed, without --replace",
        _add("de", name="fr"),
        "the bundle already has an adapter 'fr'; pass --replace or pick another name",
    ),
    "add-reserved-name": Case(
        "adapters add",
        "_base=DIR (names starting with '_' are the bundle's own)",
        _add("de", name="_base"),
        "adapter name '_base' is reserved (the bundle's own files use 'base', '_base_targets', "
        "'_adaption_base', '_base_heads' and names starting with '_'); give it another with "
        "NAME=DIR",
    ),
    "add-refit-base-name": Case(
        "adapters add",
        "base=DIR into a merged bundle (its refit sets keep the base weights in base)",
        _add("de", name="base", kind="merged"),
        "adapter name 'base' is reserved",
    ),
    "add-merged-prefix": Case(
        "adapters add",
        "a prefix-tuning adapter into a merged bundle (refit sets take LoRA-family adapters)",
        _add("prefix", kind="merged"),
        "adapter x is prefix_tuning: it adds inputs rather than weights and cannot be merged",
    ),
    "add-merged-onnx-adapter": Case(
        "adapters add",
        "--onnx-adapter on a merged bundle",
        _add("de", "x", "merged", "--onnx-adapter"),
        "--onnx-adapter applies to runtime bundles; drop it for a merged one",
    ),
    "add-prefix-unsupported": Case(
        "adapters add",
        "a prefix-tuning adapter into a bundle without prefix inputs",
        _add("prefix"),
        "re-export with --prefix-max-len 4 (or more)",
    ),
    "add-adapters-dir-symlink": Case(
        "adapters add",
        "bundle whose adapters/ is a symlink to a folder outside",
        _symlinked_adapters_dir_add,
        "is a symlink to",
    ),
    "remove-unknown": Case(
        "adapters remove",
        "a name that is not installed",
        lambda w: ["adapters", "remove", w.bundle(), "nope"],
        "the bundle has no adapter 'nope' (installed: de, es, fr)",
        subprocess=True,
    ),
    "convert-bin-code": Case(
        "adapters convert-bin",
        "adapter_model.bin whose pickle runs a shell command",
        _malicious_pickle,
        "holds more than tensors (UnpicklingError); it is refused",
    ),
    "convert-bin-missing": Case(
        "adapters convert-bin",
        "a folder without adapter_model.bin",
        lambda w: ["adapters", "convert-bin", w.adapter("fr")],
        "adapter_model.bin not found; pass the adapter folder that holds adapter_model.bin",
    ),
    # run: the request
    "prompt-too-long": Case(
        "run",
        "a 300-character prompt (the model has 256 positions)",
        lambda w: ["run", w.bundle(), "--prompt", "x" * 300, "--max-new-tokens", "2"],
        "exceeds the model's 256 positions; shorten the prompt or max_new_tokens",
    ),
    "max-new-tokens-too-many": Case(
        "run",
        "--max-new-tokens 1000 (the model has 256 positions)",
        lambda w: ["run", w.bundle(), "--prompt", "hi", "--max-new-tokens", "1000"],
        "+ max_new_tokens (1000) exceeds the model's 256 positions",
    ),
    "unknown-adapter": Case(
        "run",
        "--adapter nope",
        lambda w: _run(w.bundle(), "--adapter", "nope"),
        "unknown adapter(s) nope (installed: de, es, fr); add one with 'peft-export adapters add",
    ),
    "adapter-base-spelling": Case(
        "run",
        "--adapter base (the base model is spelled '-')",
        lambda w: _run(w.bundle(), "--adapter", "base"),
        "--adapter base: the bundle has no adapter of that name; write --adapter - for the base",
    ),
    "adapter-on-merged": Case(
        "run",
        "--adapter fr on a merged bundle",
        lambda w: _run(w.bundle("merged"), "--adapter", "fr"),
        "takes no adapters at run time (adapter 'fr' is merged into it); drop --adapter",
    ),
    "too-many-adapters": Case(
        "run",
        "3 prompts with 3 different adapters, 2 free slots",
        _many_adapters,
        "one request names 3 different adapters but the banks hold 2; split the batch",
    ),
    "adapter-count": Case(
        "run",
        "2 prompts, 3 --adapter options",
        lambda w: (
            ["run", w.bundle(), "--prompt", "a", "--prompt", "b"]
            + ["--adapter", "fr", "--adapter", "de", "--adapter", "es"]
        ),
        "2 prompts but 3 --adapter options; give one --adapter per --prompt, or one for all",
    ),
    "bad-top-p": Case(
        "run",
        "--top-p 2",
        lambda w: _run(w.bundle(), "--top-p", "2"),
        "Invalid value for '--top-p': 2.0 is not in the range 0.0<=x<=1.0; see 'peft-export run",
    ),
    "unknown-backend": Case(
        "run",
        "--backend cuda",
        lambda w: _run(w.bundle(), "--backend", "cuda"),
        "unknown backend 'cuda'; use one of ort, trt",
    ),
    "no-engine": Case(
        "run",
        "--backend trt on a bundle without engines",
        lambda w: _run(w.bundle(), "--backend", "trt"),
        "the bundle has no TensorRT engine; run 'peft-export build-engine BUNDLE' first",
    ),
    # run: a hostile or damaged bundle
    "not-a-bundle": Case(
        "run",
        "an empty folder",
        lambda w: _run(w.dir),
        "no manifest.json; is this a peft-export bundle?",
    ),
    "manifest-newer-schema": Case(
        "run",
        "manifest.json with schema_version 2",
        _run_damaged(_set("schema_version", 2)),
        "schema_version 2 is newer than this peft-export understands (1); upgrade peft-export",
        subprocess=True,
    ),
    "manifest-not-json": Case(
        "run",
        "manifest.json that is not JSON",
        _run_damaged(lambda b: (b / "manifest.json").write_text("{nope")),
        "manifest.json: not valid JSON",
    ),
    "manifest-deep": Case(
        "run",
        "manifest.json with a field nested 50,000 levels deep",
        _run_damaged(_deep_manifest),
        "JSON nested 50001 levels deep (at most 64); re-export the bundle",
    ),
    "manifest-missing-field": Case(
        "run",
        "manifest.json without 'kv'",
        _run_damaged(lambda b: _edit_manifest(b, lambda m: m.pop("kv"))),
        "manifest.json: manifest.kv is missing; re-export the bundle",
    ),
    "manifest-wrong-type": Case(
        "run",
        "manifest.json with vocab_size -1",
        _run_damaged(_set("vocab_size", -1)),
        "manifest.vocab_size must not be negative; the bundle is damaged: re-export it",
    ),
    "manifest-vocab-mismatch": Case(
        "run",
        "manifest.json with vocab_size 10**12 (the graph's logits have 260)",
        _run_damaged(_set("vocab_size", 10**12)),
        "logits is ['batch', 'seq', 260] in the graph but ['*', '*', 1000000000000]",
    ),
    "manifest-slots-huge": Case(
        "run",
        "manifest.json with adapters.slots 10**9",
        _run_damaged(_set("slots", 10**9, lambda m: m["adapters"])),
        "1000000000 adapter slots need",
    ),
    "graph-path-traversal": Case(
        "run",
        "graph.file '../bundle/model.onnx'",
        _run_damaged(_set("file", "../bundle/model.onnx", lambda m: m["graph"])),
        "bundle path '../bundle/model.onnx' escapes the bundle",
    ),
    "adapter-absolute-path": Case(
        "run",
        "installed adapter file '/etc/passwd'",
        _run_damaged(_set("file", "/etc/passwd", _installed_entry("fr")), "--adapter", "fr"),
        "bundle path '/etc/passwd' escapes the bundle",
    ),
    "engine-path-traversal": Case(
        "run",
        "engines[0].file '../x.plan'",
        _run_damaged(_set("engines", [_engine_record("../x.plan")])),
        "bundle path '../x.plan' escapes the bundle",
    ),
    "graph-symlink": Case(
        "run",
        "model.onnx a symlink to a file outside the bundle",
        _run_linked_out("model.onnx"),
        "bundle file 'model.onnx' is a symlink to",
        subprocess=True,
    ),
    "adapter-symlink": Case(
        "run",
        "adapters/fr.safetensors a symlink to a file outside",
        _run_linked_out("adapters/fr.safetensors", "--adapter", "fr"),
        "bundle file 'adapters/fr.safetensors' is a symlink to",
    ),
    "tokenizer-symlink": Case(
        "run",
        "tokenizer.json a symlink to a file outside",
        _run_linked_out("tokenizer.json"),
        "bundle file 'tokenizer.json' is a symlink to",
    ),
    "external-data-symlink": Case(
        "run",
        "model.onnx.data a symlink to a file outside",
        _symlinked_external_data,
        "bundle file 'model.onnx.data' is a symlink to",
    ),
    "external-data-traversal": Case(
        "run",
        "model.onnx whose external data location is '../weights.data'",
        _dotdot_external_data,
        "External data path escapes model directory",
    ),
    "graph-corrupt": Case(
        "run",
        "model.onnx cut in half",
        _run_damaged(lambda b: _truncate(b / "model.onnx")),
        "ONNX Runtime could not load the graph",
    ),
    "graph-missing": Case(
        "run",
        "model.onnx deleted",
        _run_damaged(lambda b: (b / "model.onnx").unlink()),
        "the bundle's graph is missing; re-export the bundle",
    ),
    "tokenizer-corrupt": Case(
        "run",
        "tokenizer.json holding '{}'",
        _run_damaged(lambda b: (b / "tokenizer.json").write_text("{}")),
        "not a readable tokenizer.json",
    ),
    "installed-nan": Case(
        "run",
        "a NaN written into adapters/fr.safetensors",
        _run_damaged(
            lambda b: _rewrite_tensors(_installed(b), _poison(np.nan, ".B")), "--adapter", "fr"
        ),
        "contains NaN or Inf; fix the adapter",
    ),
    "installed-inf": Case(
        "run",
        "an Inf written into adapters/fr.safetensors",
        _run_damaged(
            lambda b: _rewrite_tensors(_installed(b), _poison(np.inf, ".A")), "--adapter", "fr"
        ),
        "contains NaN or Inf; fix the adapter",
    ),
    "installed-wrong-shape": Case(
        "run",
        "adapters/fr.safetensors with an A of rank 3 (banks hold 4)",
        _run_damaged(
            lambda b: _rewrite_tensors(
                _installed(b),
                lambda t: t.__setitem__(_first(t, ".A"), np.zeros((3, 64), np.float32)),
            ),
            "--adapter",
            "fr",
        ),
        "is F32[3, 64], the bank slot is F32[4, 64]; re-add the adapter for this bundle",
    ),
    "installed-other-base": Case(
        "run",
        "adapters/fr.safetensors whose base_weights_sha256 is another model's",
        _run_damaged(lambda b: _stamp_other_base(_installed(b)), "--adapter", "fr"),
        "was converted for another base model (base_weights_sha256 differs)",
    ),
    "installed-huge-header": Case(
        "run",
        "adapters/fr.safetensors declaring a 2**62-byte header",
        _run_damaged(lambda b: _huge_header(_installed(b)), "--adapter", "fr"),
        "safetensors header length 4611686018427387904 is invalid",
    ),
    "installed-deep-header": Case(
        "run",
        "adapters/fr.safetensors whose header is nested 50,000 levels deep",
        _run_damaged(lambda b: _deep_header(_installed(b)), "--adapter", "fr"),
        "safetensors header: JSON nested 50001 levels deep (at most 64)",
    ),
    "installed-oversized-tensor": Case(
        "run",
        "adapters/fr.safetensors declaring a 2**30 x 2**30 tensor",
        _run_damaged(lambda b: _oversized_tensor(_installed(b)), "--adapter", "fr"),
        "tensor 'lora.x.A' points outside the file (truncated?)",
    ),
    "installed-missing": Case(
        "run",
        "adapters/fr.safetensors deleted",
        _run_damaged(lambda b: _installed(b).unlink(), "--adapter", "fr"),
        "fr.safetensors: file not found",
    ),
    # other commands
    "inspect-not-a-bundle": Case(
        "inspect",
        "a folder without manifest.json",
        lambda w: ["inspect", w.dir],
        "no manifest.json; is this a peft-export bundle?",
    ),
    "build-engine-bad-range": Case(
        "build-engine",
        "--batch 8:1",
        lambda w: ["build-engine", w.bundle(), "--batch", "8:1"],
        "--batch '8:1' is not a range; write min:opt:max with 0 <= min <= opt <= max",
    ),
    "build-engine-external-traversal": Case(
        "build-engine",
        "model.onnx whose external data location is '../weights.data'",
        _engine_dotdot_build,
        "bundle path '../weights.data' escapes the bundle",
    ),
    "verify-pickle-source": Case(
        "verify",
        "--source fr=DIR where DIR holds only adapter_model.bin",
        _verify_pickled_source,
        "which are never loaded; convert them once with 'peft-export adapters convert-bin",
    ),
    "verify-unknown-adapter": Case(
        "verify",
        "--adapter nope",
        lambda w: ["verify", w.bundle(), "--adapter", "nope"],
        "adapter(s) nope are not in the bundle; see 'peft-export adapters list'",
    ),
}


def _stamp_other_base(path: Path) -> None:
    with safe_open(str(path), "numpy") as fh:
        metadata = {**fh.metadata(), "base_weights_sha256": "0" * 64}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    save_file(tensors, str(path), metadata=metadata)


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (symlinks by target) under `roots`; writer locks are expected."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.name.endswith(".lock"):
                continue
            if path.is_symlink():
                out[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "dir"
    return out


def _invoke(case: Case, argv: list, capsys) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    if case.subprocess:
        result = subprocess.run(
            [sys.executable, "-c", CLI, *argv], capture_output=True, text=True, timeout=300
        )
        return result.returncode, result.stderr
    capsys.readouterr()
    code = _cli(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, fx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(fx.cache))
    case = CASES[case_id]
    work = Work(fx, tmp_path / "work")
    work.dir.mkdir()
    argv = case.argv(work)
    before = _snapshot(work.dir, fx.root)

    code, err = _invoke(case, argv, capsys)

    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and case.message in errors[0], err
    assert "Traceback" not in err
    assert _snapshot(work.dir, fx.root) == before, "the command changed files"
    leftovers = [p for p in (*work.dir.rglob("*"), *fx.root.rglob("*")) if ".staging-" in p.name]
    assert leftovers == []
    assert not (work.dir / "code-ran").exists()


def test_doc_lists_every_case():
    """docs/bad-inputs.md has one row per case: same ids, and the checked message in its line."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        test = re.fullmatch(r"`test_bad_input\[([a-z0-9-]+)\]`", cells[-1])
        if len(cells) == 5 and test:
            rows[test.group(1)] = cells
    assert sorted(rows) == sorted(CASES)
    assert len(rows) >= 30
    for case_id, case in CASES.items():
        _, command, _, line, _ = rows[case_id]
        assert command == f"`{case.command}`", case_id
        assert case.message.replace("|", "\\|") in line, case_id


# -- fuzzing the readers of adapter files (only the project's own error type, no hang) -----


@pytest.fixture(scope="module")
def fuzz_bundle(fx, tmp_path_factory) -> Path:
    return shutil.copytree(fx.runtime, tmp_path_factory.mktemp("fuzz") / "bundle")


def _mutated(data: bytes, draw) -> bytes:
    """Truncate, overwrite bytes (header or tensor data), or rewrite one header field."""
    kind = draw(st.sampled_from(["truncate", "bytes", "header"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "bytes":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = draw(st.sampled_from(sorted(header)))
    value = draw(FIELD_VALUES)
    if name == "__metadata__":
        header[name][draw(st.sampled_from(sorted(header[name])))] = value
    else:
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


FIELD_VALUES = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "x", ""]),
    st.lists(st.integers(-2, 2**40), max_size=4),
    st.integers(-(2**63), 2**64),
    st.none(),
    st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_store_load_of_a_mutated_adapter_file(fuzz_bundle, fx, data):
    """The runtime store reading a damaged adapters/NAME.safetensors: InferenceError or a
    correct adapter (every tensor a bank slot's shape, finite), never another exception."""
    pristine = _installed(fx.runtime).read_bytes()
    _installed(fuzz_bundle).write_bytes(_mutated(pristine, data.draw))
    store = AdapterStore(fuzz_bundle, load_manifest(fuzz_bundle))
    try:
        adapter = store.load("fr")
    except InferenceError:
        return
    for key, value in adapter.tensors.items():
        assert value.shape == store.specs[key].slot_shape
        assert np.isfinite(value).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"])
    | st.sampled_from(["use_rslora", "use_dora", "fan_in_fan_out", "peft_type", "layers_pattern"]),
    value=st.one_of(
        st.integers(-3, 64),
        st.floats(allow_nan=True, allow_subnormal=False),
        st.text(max_size=6),
        st.none(),
        st.lists(st.text(max_size=4), max_size=3),
        st.dictionaries(st.text(max_size=12), st.integers(-2, 9), max_size=2),
        st.booleans(),
    ),
)
def test_fuzz_adapters_add_with_a_hostile_config(fuzz_bundle, fx, tmp_path_factory, key, value):
    """`adapters add` of a PEFT folder whose adapter_config.json field holds any JSON value:
    installed as a file the runtime accepts, or refused with a PeftExportError (bundle
    untouched), never another exception."""
    folder = tmp_path_factory.mktemp("hostile-config") / "adapter"
    shutil.copytree(fx.adapters / "de", folder)
    _edit_json(folder / "adapter_config.json", lambda c: c.__setitem__(key, value))
    _installed(fuzz_bundle).write_bytes(_installed(fx.runtime).read_bytes())
    before = _snapshot(fuzz_bundle)
    try:
        add_adapter(fuzz_bundle, "fuzzed", folder)
    except PeftExportError:
        assert _snapshot(fuzz_bundle) == before
        return
    AdapterStore(fuzz_bundle, load_manifest(fuzz_bundle)).load("fuzzed")
    remove_adapter(fuzz_bundle, "fuzzed")
