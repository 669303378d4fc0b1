"""The server as a Ray Serve application: N replicas, each running its own scheduler behind
the same OpenAI-compatible API. Ray Serve does the routing (no router of ours): a request
carrying the header `serve_multiplexed_model_id: ADAPTER` goes to a replica that already
holds that adapter (`serve.multiplexed`, keyed by adapter name); one without it goes to any
replica, which loads the adapter on demand.

    peft-export serve bundle/ --ray --replicas 2               # a local Ray instance
    RAY_ADDRESS=ray://head:10001 peft-export serve bundle/ --ray --replicas 8   # a cluster
    serve run peft_export.runtime.serving.ray_app:app bundle=/models/bundle replicas=2

See docs/serving.md for the multi-node path (a Ray cluster, e.g. KubeRay).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import serve
from starlette.concurrency import run_in_threadpool

from peft_export.runtime.serving.settings import ServeSettings

MODEL_ID_HEADER = "serve_multiplexed_model_id"
ADAPTERS_PER_REPLICA = 64
"""Adapters Ray Serve counts as held per replica (its multiplexing LRU); the scheduler's own
tiers (host cache, bank slots) bound memory."""
_REPLICA: dict[str, Any] = {}
"""The replica living in this worker process (one per Ray Serve replica actor)."""


async def _asgi(scope: dict, receive: Any, send: Any) -> None:
    """The ingress Ray Serve wraps: hands each request to this process's server, after
    loading the request's multiplexed adapter (which tells Ray this replica holds it)."""
    replica = _REPLICA["replica"]
    if scope["type"] == "http":
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await replica.adapter(model_id)
    await replica.server.app(scope, receive, send)


def _ingress():
    """Ray Serve calls this in each replica for its ASGI app (an app builder)."""
    return _asgi


@serve.ingress(_ingress)
class OpenAIReplica:
    """One replica: a loaded bundle, its engine (the scheduler) and the HTTP API."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings(**settings)
        self.server = self.settings.build_server()
        self.base_name = self.server.config.base_name
        _REPLICA["replica"] = self

    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_PER_REPLICA)
    async def adapter(self, model_id: str) -> str:
        """Bring the adapter into this replica's host cache (the base needs nothing)."""
        if model_id != self.base_name and self.server.engine.owns(model_id):
            await run_in_threadpool(self.server.engine.load_adapter, model_id)
        return model_id


def build_application(
    settings: ServeSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    target_ongoing_requests: int = 16,
    replica_cpus: float | None = None,
):
    """The bound application. With `max_replicas` Ray Serve autoscales between `replicas`
    and it, aiming at `target_ongoing_requests` per replica. A replica asks Ray for
    `replica_cpus` (default: the settings' ORT threads, or 1)."""
    options: dict[str, Any] = {
        "name": "peft-export",
        "ray_actor_options": {"num_cpus": replica_cpus or settings.threads or 1},
        "max_ongoing_requests": settings.max_rows + settings.max_queue,
        "health_check_period_s": 2,
        "health_check_timeout_s": 10,
    }
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        options["num_replicas"] = replicas
    return serve.deployment(OpenAIReplica, **options).bind(dataclasses.asdict(settings))


def app(args: dict[str, str]):
    """Application builder for `serve run peft_export.runtime.serving.ray_app:app bundle=...`
    (other keys: replicas, max_replicas, target_ongoing_requests, threads, engine, api_key)."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("pass bundle=PATH (a peft-export bundle every node can read)")
    numbers = {"replicas": 1, "max_replicas": None, "target_ongoing_requests": 16}
    scaling = {k: int(args.pop(k)) if k in args else v for k, v in numbers.items()}
    fields = {f.name: f.type for f in dataclasses.fields(ServeSettings)}
    settings = {k: (int(v) if "int" in str(fields.get(k)) else v) for k, v in args.items()}
    return build_application(ServeSettings(**settings), **scaling)


def run_ray(settings: ServeSettings, *, host: str, port: int, **scaling: Any) -> None:
    """`peft-export serve --ray`: connect to RAY_ADDRESS's cluster, or start a local Ray
    instance on loopback (no dashboard), then serve until interrupted."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(settings, **scaling), name="peft-export", blocking=True)
