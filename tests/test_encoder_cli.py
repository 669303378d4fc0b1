"""`peft-export export / run / verify` on encoder bundles (in-process CLI, tiny models)."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli
from encoder_tiny import make_encoder_adapter, save_tiny_encoder

TASK = "question-answering"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc-cli")
    base = save_tiny_encoder("bert", TASK, root / "base")
    a = make_encoder_adapter(base, "bert", TASK, root / "qa-a", seed=3)
    b = make_encoder_adapter(base, "bert", TASK, root / "qa-b", seed=4, r=2)
    out = root / "bundle"
    assert (
        run_cli(
            "export",
            "--base",
            str(base),
            "--adapter",
            f"a={a}",
            "--adapter",
            f"b={b}",
            "--mode",
            "runtime",
            "--out",
            str(out),
        )
        == 0
    )
    return {"root": root, "base": base, "a": a, "b": b, "out": out}


def test_run_answers_each_question_from_its_context(work, capsys):
    capsys.readouterr()
    code = run_cli(
        "run",
        str(work["out"]),
        "--prompt",
        "where is paris",
        "--prompt",
        "who won",
        "--context",
        "paris is the capital of france",
        "--adapter",
        "a",
        "--adapter",
        "b",
        "--json",
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in lines] == ["a", "b"]
    for record in lines:
        answer = record["result"]
        assert answer["text"] == "paris is the capital of france"[answer["start"] : answer["end"]]


def test_run_refuses_a_question_without_context(work, capsys):
    assert run_cli("run", str(work["out"]), "--prompt", "where is paris") == 2
    assert "--context" in capsys.readouterr().err


def test_verify_passes_and_catches_the_wrong_adapter(work, capsys):
    assert run_cli("verify", str(work["out"])) == 0
    report = json.loads((work["out"] / "reports" / "parity.json").read_text())
    assert report["passed"] and report["mixed_batch"]["identical"]
    assert [r["adapter"] for r in report["adapters"]] == [None, "a", "b"]
    assert max(r["max_abs"]["start_logits"] for r in report["adapters"]) <= 1e-4
    # the bundle's adapter a judged against adapter b's folder must fail
    assert run_cli("verify", str(work["out"]), "--adapter", "a", "--source", f"a={work['b']}") == 1


def test_inspect_shows_the_task_not_a_kv_cache(work, capsys):
    capsys.readouterr()
    assert run_cli("inspect", str(work["out"])) == 0
    text = capsys.readouterr().out
    assert "encoder     question-answering" in text and "kv cache" not in text
