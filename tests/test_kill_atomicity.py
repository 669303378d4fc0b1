"""SIGKILL during `adapters add`, `--replace` and `export --force` leaves a whole bundle.

Commands run in processes forked from a server process that imported peft-export, torch and
peft once (so a run costs a fork, not a Python start). In those processes every file-system
step of a write (os.replace, os.rename, os.link, the directory exchange) prints a marker and
pauses briefly, so a kill can be aimed at each step in turn; a few more kills land after random
delays. After each kill the bundle must be either the previous version (every file hashing as
before, generation as before) or the new one (manifest and adapter files consistent, generation
as an uninterrupted run produced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.cli import main
from peft_export.runtime import load_bundle

PAUSE_S = 0.02
SERVER = f"""
import json, os, sys, time
from peft_export.bundle import atomic
from peft_export.exporter.cli import main
import peft, torch, peft_export.exporter.runtime_adapters.bundle_adapters  # warm imports

def marked(step, name):
    def run(*args, **kwargs):
        print("step", name, flush=True)
        time.sleep({PAUSE_S})
        return step(*args, **kwargs)
    return run

print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        sys.stdout = open(os.dup(1), "w", buffering=1)
        sys.stderr = open(os.devnull, "w")
        os.replace = marked(os.replace, "replace")
        os.rename = marked(os.rename, "rename")
        os.link = marked(os.link, "link")
        atomic._exchange = marked(atomic._exchange, "exchange")
        try:
            main(json.loads(line))
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    print("pid", pid, flush=True)
    print("exit", os.waitpid(pid, 0)[1], flush=True)
"""
PROMPT = [[5, 6, 7, 8]]
SEED = 20261129


class ForkServer:
    """Runs CLI commands in forked children; kills a child after its k-th marker or a delay."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], kill_at: int | None = None, delay: float | None = None):
        """Returns (markers seen, wait status); kill_at/delay None: run to the end."""
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + "\n")
        self.proc.stdin.flush()
        pid = int(self._line("pid"))
        timer = None
        if kill_at is None and delay is not None:
            timer = threading.Timer(delay, _kill, args=(pid,))
            timer.start()
        seen = 0
        while True:
            line = self.proc.stdout.readline()
            assert line, "the fork server died"
            if line.startswith("exit "):
                break
            if line.startswith("step "):
                seen += 1
                if seen == kill_at:
                    time.sleep(random.uniform(0, PAUSE_S))
                    _kill(pid)
        if timer is not None:
            timer.cancel()
        return seen, int(line.split()[1])

    def _line(self, key: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            assert line, "the fork server died"
            if line.startswith(key + " "):
                return line.split()[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server():
    forks = ForkServer()
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama folder, a runtime bundle with adapter fr (slots for more), two adapters."""
    root = tmp_path_factory.mktemp("kill")
    base = save_tiny_base("llama", root / "base")
    llama = tiny_model("llama")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    adapters = {
        name: make_adapter(llama, "lora", root, name=name, seed=seed, **qv)
        for name, seed in [("fr", 1), ("de", 2)]
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


def _kill_points(rng: random.Random, markers: int, duration: float, timed: int):
    """Every marker, then `timed` random delays within an uninterrupted run's duration."""
    points = [(k, None) for k in range(1, markers + 1)]
    return points + [(None, rng.uniform(0.1, 1.0) * duration) for _ in range(timed)]


def _with(argv: list[str], bundle: Path) -> list[str]:
    return [str(bundle) if a == "BUNDLE" else a for a in argv]


@pytest.mark.parametrize("replace", [False, True], ids=["add", "replace"])
def test_killed_adapters_add_leaves_old_or_new(server, setup, tmp_path, replace):
    _, _, adapters, pristine = setup
    name = "fr" if replace else "de"
    argv = ["adapters", "add", "BUNDLE", f"{name}={adapters['de']}"] + ["--replace"] * replace
    old_hashes = _hashes(pristine)
    old_tokens = _tokens(pristine, "fr")
    old_sha = {n: e.sha256 for n, e in load_manifest(pristine).adapters.installed.items()}

    done = shutil.copytree(pristine, tmp_path / "done")
    start = time.perf_counter()
    markers, status = server.run(_with(argv, done))
    duration = time.perf_counter() - start
    assert status == 0 and markers >= 2
    _check_consistent(done)
    new_tokens = _tokens(done, name)
    assert new_tokens != old_tokens or not replace, "the replacement must change the output"

    rng = random.Random(SEED + replace)
    outcomes = []
    for i, (kill_at, delay) in enumerate(_kill_points(rng, markers, duration, timed=2)):
        bundle = shutil.copytree(pristine, tmp_path / f"trial{i}")
        server.run(_with(argv, bundle), kill_at, delay)
        _check_consistent(bundle)
        entry = load_manifest(bundle).adapters.installed.get(name)
        is_new = entry is not None and entry.sha256 != old_sha.get(name)
        if is_new:
            assert _tokens(bundle, name) == new_tokens
        else:
            assert _hashes(bundle) == old_hashes, f"kill at {kill_at} changed the old bundle"
            assert _tokens(bundle, "fr") == old_tokens
        outcomes.append("new" if is_new else "old")
        shutil.rmtree(bundle)
    print(f"adapters add{' --replace' * replace}: {markers} steps, killed {outcomes}")
    assert "old" in outcomes


def test_killed_export_force_leaves_old_or_new(server, setup, tmp_path):
    _, base, _, pristine = setup
    argv = ["export", "--base", str(base), "--out", "BUNDLE", "--force"]
    old_hashes = _hashes(pristine)
    old_tokens = _tokens(pristine, "fr")

    done = shutil.copytree(pristine, tmp_path / "done")
    markers, status = server.run(_with(argv, done))
    assert status == 0 and load_manifest(done).mode == "merged"
    new_tokens = _tokens(done, None)

    outcomes = []
    for i, kill_at in enumerate(range(max(1, markers - 1), markers + 1)):
        bundle = shutil.copytree(pristine, tmp_path / f"trial{i}")
        server.run(_with(argv, bundle), kill_at)
        manifest = load_manifest(bundle)
        if manifest.mode == "merged":
            assert _tokens(bundle, None) == new_tokens
        else:
            assert _hashes(bundle) == old_hashes, f"kill at {kill_at} changed the old bundle"
            assert _tokens(bundle, "fr") == old_tokens
        outcomes.append(manifest.mode)
    print(f"export --force: {markers} steps, killed {outcomes}")
