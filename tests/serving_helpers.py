"""A tiny runtime bundle with several LoRA-family adapters, and a `peft-export serve`
subprocess on a free loopback port, for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from tiny import make_adapters, save_tiny_tokenizer, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def serving_bundle(out: Path, table: dict, *, slots: int = 8, seed: int = 0) -> Path:
    """Export a tiny llama (with tokenizer and chat template) serving `table`'s adapters
    (LoRA family and prompt-side), PEFT folders under out/peft."""
    base = tiny_model("llama", seed=seed)
    folders = make_adapters(base, table, out / "peft", first_seed=20)
    export_bundle(
        InMemoryBase(base, save_tiny_tokenizer(out / "tokenizer"), source="tiny-llama"),
        list(folders.items()),
        out=out / "bundle",
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"max_rank": 4, "slots": slots},
    )
    return out / "bundle"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


@contextlib.contextmanager
def serve_process(bundle: Path, *args: str, timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """`peft-export serve BUNDLE --port FREE ARGS` in a subprocess; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-c", "from peft_export.exporter.cli import main; main()"]
    cmd += ["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(  # cwd: not the checkout, whose peft_export/ would shadow the package
        cmd, cwd=bundle.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def alone(bundle_dir: Path, prompts: Sequence, adapters: Sequence, max_tokens: int) -> list[str]:
    """Each prompt run alone through Bundle.generate (the reference of a served request)."""
    from peft_export.runtime import load_bundle

    bundle = load_bundle(bundle_dir, threads=1)
    return [
        bundle.generate(p, adapters=a, max_new_tokens=max_tokens).texts[0]
        for p, a in zip(prompts, adapters, strict=True)
    ]
