"""The runtime must load a bundle and generate on a box without torch, transformers or peft."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import torch
from tiny import save_tiny_tokenizer, tiny_model

BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "transformers", "peft")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    from peft_export.runtime import load_bundle
    from peft_export.exporter.cli import main

    bundle = load_bundle(sys.argv[1], threads=1)
    result = bundle.generate([[1, 70, 80, 90], "Hi"], max_new_tokens=6, ignore_eos=True)
    from peft_export.runtime.scheduler import Scheduler, ServeRequest

    with Scheduler(bundle) as scheduler:
        request = ServeRequest([1, 70, 80, 90], max_tokens=6, ignore_eos=True)
        served = scheduler.submit(request).result(timeout=60).token_ids
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    report = {"ids": result.token_ids, "texts": result.texts, "loaded": loaded, "served": served}
    print(json.dumps(report))
    sys.stdout.flush()
    main(["run", sys.argv[1], "--prompt", "Hi", "--max-new-tokens", "3", "--json"])
    """
)


def test_generate_without_torch(tmp_path):
    from peft_export.exporter.pipeline import export_model

    model = tiny_model("llama", seed=0)
    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer")
    export_model(copy.deepcopy(model), tmp_path / "bundle", tokenizer_dir=tokenizer)

    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first, cli_line = proc.stdout.strip().splitlines()
    report = json.loads(first)
    assert report["loaded"] == []

    ids = torch.tensor([[1, 70, 80, 90]])
    expected = []
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    assert report["ids"][0] == expected
    assert report["served"] == expected, "the scheduler (no torch) differs from generate"
    assert len(report["ids"][1]) == 6
    assert json.loads(cli_line)["token_ids"] == report["ids"][1][:3]
