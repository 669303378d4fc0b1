"""SIGKILL during `adapters add` and `export --force` leaves the previous bundle, whole.

The command runs in a subprocess whose file-system steps (os.replace, os.rename, os.link and
the directory exchange) print a marker and pause briefly, so a kill can be aimed at any step:
right after marker k for a random k, or after a random delay. After each kill the bundle must
be either the previous version (every file hashing as before, generation as before) or the new
one (manifest and adapter files consistent, generation as the uninterrupted command produced).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.cli import main
from peft_export.runtime import load_bundle

PAUSE_S = 0.05
MARKER = "@@step"
RUNNER = f"""
import os, sys, time
from peft_export.bundle import atomic

def marked(step, name):
    def run(*args, **kwargs):
        print("{MARKER}", name, flush=True)
        time.sleep({PAUSE_S})
        return step(*args, **kwargs)
    return run

os.replace = marked(os.replace, "replace")
os.rename = marked(os.rename, "rename")
os.link = marked(os.link, "link")
atomic._exchange = marked(atomic._exchange, "exchange")
from peft_export.exporter.cli import main
main(sys.argv[1:])
"""
PROMPT = [[5, 6, 7, 8]]
SEED = 20261129


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama folder, a runtime bundle with adapter fr (slots for more), two adapters."""
    root = tmp_path_factory.mktemp("kill")
    base = save_tiny_base("llama", root / "base")
    llama = tiny_model("llama")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    adapters = {
        n: make_adapter(llama, "lora", root, name=n, seed=s, **qv)
        for n, s in [("fr", 1), ("de", 2)]
    }
    bundle = root / "pristine"
    banks = ["--mode", "runtime", "--slots", "4", "--max-rank", "4", "--methods", "lora"]
    fr = f"fr={adapters['fr']}"
    try:
        main(["export", "--base", str(base), "--adapter", fr, *banks, "--out", str(bundle)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return root, base, adapters, bundle


def _hashes(root: Path) -> dict[str, str]:
    """Every file a reader sees (dot-prefixed staging entries are ignored by readers)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _tokens(bundle: Path, adapter: str | None) -> list[int]:
    loaded = load_bundle(bundle, threads=1)
    return loaded.generate(PROMPT, adapters=adapter, max_new_tokens=4).token_ids[0]


def _check_consistent(bundle: Path) -> None:
    """Manifest parses and every installed adapter file is the one the manifest recorded."""
    manifest = load_manifest(bundle)
    for name, entry in manifest.adapters.installed.items():
        digest = hashlib.sha256((bundle / entry.file).read_bytes()).hexdigest()
        assert digest == entry.sha256, f"{name}: file and manifest disagree"


def _run_killed(argv: list[str], kill_at: int | None, delay: float) -> tuple[int, int]:
    """Run the CLI with markers; SIGKILL after marker `kill_at` (+delay) or after `delay`.

    Returns (markers seen, return code); -9 means killed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = 0
    if kill_at is None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    else:
        for line in proc.stdout:
            if line.startswith(MARKER):
                seen += 1
                if seen == kill_at:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    break
    proc.stdout.close()
    return seen, proc.wait(timeout=300)


def _trials(rng: random.Random, markers: int, count: int, duration: float | None):
    """Kill points: the last marker (the final swap), `count` random markers, and, when
    `duration` is given, one random delay within the uninterrupted run's duration."""
    points = {markers} | set(rng.sample(range(1, markers + 1), min(count, markers)))
    for k in sorted(points):
        yield k, rng.uniform(0, PAUSE_S)
    if duration is not None:
        yield None, rng.uniform(0.5, 1.0) * duration


def _dry_run(argv: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.count(MARKER), time.perf_counter() - start


@pytest.mark.parametrize("replace", [False, True], ids=["add", "replace"])
def test_killed_adapters_add_leaves_old_or_new(setup, tmp_path, replace):
    _, _, adapters, pristine = setup
    name = "fr" if replace else "de"
    argv = ["adapters", "add", "BUNDLE", f"{name}={adapters['de']}"] + (["--replace"] * replace)
    old_hashes = _hashes(pristine)
    old_tokens = _tokens(pristine, "fr")
    old_sha = {n: e.sha256 for n, e in load_manifest(pristine).adapters.installed.items()}

    done = shutil.copytree(pristine, tmp_path / "done")
    markers, duration = _dry_run([str(done) if a == "BUNDLE" else a for a in argv])
    _check_consistent(done)
    new_tokens = _tokens(done, name)
    assert new_tokens != old_tokens or not replace, "the replacement must change the output"

    rng = random.Random(SEED + replace)
    outcomes = []
    for i, (kill_at, delay) in enumerate(_trials(rng, markers, 2, duration)):
        bundle = shutil.copytree(pristine, tmp_path / f"trial{i}")
        _run_killed([str(bundle) if a == "BUNDLE" else a for a in argv], kill_at, delay)
        _check_consistent(bundle)
        entry = load_manifest(bundle).adapters.installed.get(name)
        is_new = entry is not None and entry.sha256 != old_sha.get(name)
        if is_new:
            assert _tokens(bundle, name) == new_tokens
        else:
            assert _hashes(bundle) == old_hashes, f"kill at {kill_at} changed the old bundle"
            assert _tokens(bundle, "fr") == old_tokens
        outcomes.append((kill_at, "new" if is_new else "old"))
    print(f"adapters add ({'replace' if replace else 'new name'}): {markers} steps, {outcomes}")


def test_killed_export_force_leaves_old_or_new(setup, tmp_path):
    _, base, _, pristine = setup
    argv = ["export", "--base", str(base), "--out", "OUT", "--force"]
    old_hashes = _hashes(pristine)
    old_tokens = _tokens(pristine, "fr")

    done = shutil.copytree(pristine, tmp_path / "done")
    markers, _ = _dry_run([str(done) if a == "OUT" else a for a in argv])
    assert load_manifest(done).mode == "merged"
    new_tokens = _tokens(done, None)

    rng = random.Random(SEED)
    outcomes = []
    for i, (kill_at, delay) in enumerate(_trials(rng, markers, 1, None)):
        bundle = shutil.copytree(pristine, tmp_path / f"trial{i}")
        _run_killed([str(bundle) if a == "OUT" else a for a in argv], kill_at, delay)
        manifest = load_manifest(bundle)
        if manifest.mode == "merged":
            assert _tokens(bundle, None) == new_tokens
        else:
            assert _hashes(bundle) == old_hashes, f"kill at {kill_at} changed the old bundle"
            assert _tokens(bundle, "fr") == old_tokens
        outcomes.append((kill_at, manifest.mode))
    print(f"export --force: {markers} steps, {outcomes}")
