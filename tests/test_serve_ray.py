"""The Ray Serve application on a local Ray instance pinned to 127.0.0.1 (no dashboard), two
replicas: requests for six adapters (routed by `serve_multiplexed_model_id`) all equal the
same prompt run alone through Bundle.generate; then one replica is killed mid-traffic and
every request either completes correctly or fails with an HTTP error, none hangs."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import alone, free_port, serving_bundle

# Before ray is imported: keep the local instance's node address 127.0.0.1 (Ray otherwise
# replaces a loopback node address by the machine's own).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ADAPTERS = {
    "a1": ("lora", {}),
    "a2": ("lora", {"r": 2}),
    "a3": ("rslora", {}),
    "a4": ("dora", {}),
    "a5": ("ia3", {}),
    "a6": ("prefix_tuning", {"num_virtual_tokens": 3}),
}
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 90
PROMPTS = ["Hello", "Tell me a story", "abc def"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return serving_bundle(tmp_path_factory.mktemp("ray"), ADAPTERS)


@pytest.fixture(scope="module")
def reference(bundle_dir):
    pairs = [(p, a) for a in ADAPTERS for p in PROMPTS]
    texts = alone(bundle_dir, [p for p, _ in pairs], [a for _, a in pairs], MAX_TOKENS)
    return dict(zip(pairs, texts, strict=True))


@pytest.fixture(scope="module")
def ray_url(bundle_dir, monkeypatch_module):
    from peft_export.runtime.serving.ray_app import build_application
    from peft_export.runtime.serving.settings import ServeSettings

    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    # Ray workers put the driver's working folder on sys.path: not the checkout, whose
    # peft_export/ (the namespace root alone) would shadow the package.
    monkeypatch_module.chdir(bundle_dir.parent)
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=4,
        log_to_driver=False,
        object_store_memory=128 * 2**20,
    )
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(bundle=str(bundle_dir), threads=1, max_rows=8)
        serve.run(build_application(settings, replicas=2), name="peft-export", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _chat(url: str, adapter: str, prompt: str) -> tuple[int, str]:
    body = {
        "model": adapter,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "serve_multiplexed_model_id": adapter},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            return reply.status, json.loads(reply.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError) as exc:
        return 599, f"connection failed: {exc}"


def test_two_replicas_serve_six_adapters(ray_url, reference):
    jobs = list(reference)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: _chat(ray_url, job[1], job[0]), jobs))
    for job, (status, text) in zip(jobs, replies, strict=True):
        assert status == 200, (job, text)
        assert text == reference[job], job
    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if "REPLICA" in a["name"]
    ]
    assert len(replicas) == 2


def test_killed_replica_fails_requests_cleanly(ray_url, reference):
    jobs = list(reference) * 2
    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_chat, ray_url, a, p) for p, a in jobs]
        time.sleep(1.0)
        victim = next(
            a for a in ray.util.list_named_actors(all_namespaces=True) if "REPLICA" in a["name"]
        )
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        results = [f.result(timeout=2 * REQUEST_TIMEOUT_S) for f in futures]
    assert time.monotonic() - started < 2 * REQUEST_TIMEOUT_S
    failed = 0
    for (prompt, adapter), (status, text) in zip(jobs, results, strict=True):
        if status == 200:
            assert text == reference[(prompt, adapter)], (prompt, adapter)
        else:
            failed += 1
            assert status >= 500 and text, (status, text)
    assert failed < len(jobs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray Serve replaces the replica; traffic goes on
        status, text = _chat(ray_url, "a1", PROMPTS[0])
        if status == 200:
            break
        time.sleep(1)
    assert (status, text) == (200, reference[(PROMPTS[0], "a1")])
