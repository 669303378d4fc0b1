"""`peft-export serve` used through the official `openai` client, as a user would: chat,
completions, streaming, an unknown model, a bad parameter; every greedy answer equals the same
prompt run alone through `Bundle.generate`. Plus the server's own guards (API key, body and
prompt limits, adapter folders only under --adapter-root) and its Prometheus metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from serving_helpers import alone, serve_process, serving_bundle

openai = pytest.importorskip("openai")

ADAPTERS = {"fr": ("lora", {}), "de": ("dora", {}), "it": ("ia3", {})}
BASE = "tiny-llama"
KEY = "test-key-123"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return serving_bundle(tmp_path_factory.mktemp("serve"), ADAPTERS)


@pytest.fixture(scope="module")
def server(bundle_dir):
    root = bundle_dir.parent / "peft"
    args = ["--api-key", KEY, "--threads", "1"]
    args += ["--adapter-root", str(root), "--max-body-bytes", "20000"]
    with serve_process(bundle_dir, *args) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=60, max_retries=0)


def test_chat_and_completions_equal_requests_run_alone(client, bundle_dir):
    prompts = ["Hello there", "Bonjour", "Guten Tag", "Ciao"]
    models = [BASE, "fr", "de", "it"]
    want = alone(bundle_dir, prompts, [None, "fr", "de", "it"], MAX_TOKENS)
    for prompt, model, text in zip(prompts, models, want, strict=True):
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert reply.choices[0].message.content == text
        assert reply.usage.completion_tokens >= 1
    raw = alone_raw(bundle_dir, "Once upon", "fr")
    completion = client.completions.create(
        model="fr", prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.choices[0].text == raw


def alone_raw(bundle_dir, prompt, adapter):
    from peft_export.runtime import load_bundle

    bundle = load_bundle(bundle_dir, threads=1)
    result = bundle.generate(
        prompt, adapters=adapter, max_new_tokens=MAX_TOKENS, chat_template=False
    )
    return result.texts[0]


def test_streaming_sends_the_same_text_in_pieces(client, bundle_dir):
    [want] = alone(bundle_dir, ["Stream me"], ["de"], MAX_TOKENS)
    stream = client.chat.completions.create(
        model="de",
        messages=[{"role": "user", "content": "Stream me"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == want
    assert reasons[-1] in ("stop", "length") and usage.completion_tokens >= 1
    completion = client.completions.create(
        model=BASE, prompt="abc", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in completion) == alone_raw_n(bundle_dir, "abc", 4)


def alone_raw_n(bundle_dir, prompt, n):
    from peft_export.runtime import load_bundle

    bundle = load_bundle(bundle_dir, threads=1)
    return bundle.generate(prompt, max_new_tokens=n, chat_template=False).texts[0]


def test_unknown_model_is_404_and_bad_parameter_400(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "nope" in err.value.message and err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="fr", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fr", prompt="x", n=2)
    assert "n=1" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fr", prompt="x", max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"


def test_models_lists_base_and_adapters(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {BASE, *ADAPTERS}


def test_guards(server):
    no_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    big = json.dumps({"model": BASE, "prompt": "x" * 30000}).encode()
    assert _post(server, "/v1/completions", big)[0] == 413
    status, body = _post(
        server, "/v1/adapters", json.dumps({"name": "x", "path": "../.."}).encode()
    )
    assert status == 403 and "adapter-root" in body["error"]["message"]


def test_metrics_count_tokens_and_latencies(client, server):
    client.completions.create(model="fr", prompt="metrics", max_tokens=3, temperature=0)
    request = urllib.request.Request(
        f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}
    )
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    values = _samples(text)
    assert values["peft_export_generated_tokens_total"] >= 3
    assert values["peft_export_time_to_first_token_seconds_count"] >= 1
    assert values["peft_export_inter_token_seconds_count"] >= 2
    for name in (
        "peft_export_queue_depth",
        "peft_export_running_rows",
        "peft_export_tokens_per_second",
    ):
        assert name in values


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line.split(" ")[0]:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _post(server: str, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server}{path}",
        data=data,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_full_queue_is_503(bundle_dir):
    with serve_process(bundle_dir, "--engine", "threads", "--max-queue", "0") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=BASE, prompt="x", max_tokens=2)
    assert err.value.status_code == 503 and "retry" in err.value.message
