"""`peft-export serve`: an OpenAI-compatible HTTP server over a bundle (no torch needed).

One process runs the continuous-batching scheduler behind FastAPI + uvicorn; `--ray` runs
`--replicas` of it as a Ray Serve application instead (runtime/serving/ray_app.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@click.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    default=None,
    envvar="PEFT_EXPORT_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or set PEFT_EXPORT_API_KEY).",
)
@click.option(
    "--adapter-root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="POST /v1/adapters loads adapter folders only under this folder (default: refused).",
)
@click.option("--model-name", default=None, help="`model` meaning no adapter (default: base's).")
@click.option(
    "--engine",
    type=click.Choice(["scheduler", "threads"]),
    default="scheduler",
    show_default=True,
    help="scheduler: one batch across requests; threads: one request per thread (baseline).",
)
@click.option(
    "--max-rows",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Rows decoding together (threads engine: requests running at once).",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(0),
    help="Requests waiting for a row; more are refused with 503.",
)
@click.option(
    "--kv-pool-tokens",
    default=8192,
    show_default=True,
    type=click.IntRange(1),
    help="KV cache positions the running rows share (admission waits for room).",
)
@click.option(
    "--step-token-budget",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Most prompt tokens one step prefills (while no row decodes); longer prompts are chunked.",
)
@click.option(
    "--prefill-share",
    default=0.75,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="While rows decode, a step's prefill chunk takes at most this share of a decode call's "
    "time (measured), bounding what a long prompt adds to their inter-token latency.",
)
@click.option(
    "--max-body-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--max-prompt-tokens",
    default=None,
    type=click.IntRange(1),
    help="Longest prompt accepted (default: the model's context).",
)
@click.option("--threads", default=None, type=click.IntRange(1), help="ORT intra-op threads.")
@click.option("--allow-remote", is_flag=True, help="Allow a --host other than loopback.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve with Ray Serve replicas.")
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Ray Serve replicas (each loads the bundle); the autoscaling minimum.",
)
@click.option("--max-replicas", default=None, type=click.IntRange(1), help="Ray autoscaling.")
@click.option(
    "--target-ongoing-requests",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Ray autoscaling: requests per replica it aims at.",
)
def command(
    bundle: Path,
    host: str,
    port: int,
    api_key: str | None,
    adapter_root: Path | None,
    model_name: str | None,
    engine: str,
    max_rows: int,
    max_queue: int,
    kv_pool_tokens: int,
    step_token_budget: int,
    prefill_share: float,
    max_body_bytes: int,
    max_prompt_tokens: int | None,
    threads: int | None,
    allow_remote: bool,
    use_ray: bool,
    replicas: int,
    max_replicas: int | None,
    target_ongoing_requests: int,
) -> None:
    """Serve BUNDLE over HTTP: /v1/completions, /v1/chat/completions, /v1/models, ...

    `model` in a request is an adapter name, or the base model's name for no adapter.
    """
    from peft_export.exporter.errors import ExportError
    from peft_export.runtime.serving.settings import ServeSettings

    if host not in LOOPBACK and not allow_remote:
        raise ExportError(
            f"--host {host} is not a loopback address; pass --allow-remote (with --api-key) "
            "to serve other machines"
        )
    settings = ServeSettings(
        bundle=str(bundle.resolve()),
        engine=engine,
        threads=threads,
        max_rows=max_rows,
        max_queue=max_queue,
        kv_pool_tokens=kv_pool_tokens,
        step_token_budget=step_token_budget,
        prefill_share=prefill_share,
        api_key=api_key,
        adapter_root=str(adapter_root.resolve()) if adapter_root else None,
        model_name=model_name,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
    )
    if use_ray:
        if not os.environ.get("RAY_ADDRESS"):
            # A local instance stays on loopback: Ray >= 2.5x replaces a 127.0.0.1 node address
            # by the machine's own unless its cluster mode is off (read when ray is imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from peft_export.runtime.serving.ray_app import run_ray

        run_ray(
            settings,
            host=host,
            port=port,
            replicas=replicas,
            max_replicas=max_replicas,
            target_ongoing_requests=target_ongoing_requests,
        )
        return
    import uvicorn

    app = settings.build_app()
    click.echo(f"serving {bundle} on http://{host}:{port} (engine {engine})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("PEFT_EXPORT_LOG", "warning"))
