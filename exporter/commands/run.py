"""`peft-export run`: generate from a bundle with the Python runtime (no torch needed)."""

from __future__ import annotations

import json
import sys

import click

_OLD_NO_ADAPTER = "base"
"""How `--adapter` spelled the base model before `names.NO_ADAPTER`, which no adapter can take."""


@click.command("run")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (repeatable).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Runtime adapter per prompt (repeatable; once applies to all; '-' for none).",
)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(0))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=None, type=int, help="Sampling seed (row i uses seed + i).")
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--system", "system_prompt", default=None, help="System message for the template.")
@click.option("--no-chat-template", is_flag=True, help="Send prompts raw, without the template.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt.")
@click.option("--backend", default="ort", show_default=True, help="Runtime backend: ort or trt.")
@click.option("--threads", default=None, type=click.IntRange(1), help="ORT intra-op threads.")
@click.option(
    "--context",
    "contexts",
    multiple=True,
    help="Question-answering bundles: the passage each --prompt (a question) is answered from.",
)
def command(
    bundle: str,
    prompts: tuple[str, ...],
    adapters: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop_strings: tuple[str, ...],
    system_prompt: str | None,
    no_chat_template: bool,
    stream: bool,
    as_json: bool,
    backend: str,
    threads: int | None,
    contexts: tuple[str, ...],
) -> None:
    """Generate text for each --prompt from BUNDLE (encoder bundles: print each text's label,
    token labels, answer or embedding)."""
    from peft_export.bundle import names as bundle_names
    from peft_export.exporter.errors import ExportError
    from peft_export.runtime import TokenEvent, load_bundle

    if adapters and len(adapters) not in (1, len(prompts)):
        raise ExportError(
            f"{len(prompts)} prompts but {len(adapters)} --adapter options; "
            "give one --adapter per --prompt, or one for all"
        )
    names = [None if a == bundle_names.NO_ADAPTER else a for a in adapters] or None
    options = {"threads": threads} if threads and backend == "ort" else {}
    loaded = load_bundle(bundle, backend=backend, **options)
    if loaded.manifest.encoder is not None:
        from peft_export.exporter.encoders.run_output import run_encoder

        run_encoder(loaded, prompts, names, contexts, as_json)
        return
    if _OLD_NO_ADAPTER in adapters and _OLD_NO_ADAPTER not in loaded.manifest.adapters.installed:
        raise ExportError(
            f"--adapter {_OLD_NO_ADAPTER}: the bundle has no adapter of that name; "
            f"write --adapter {bundle_names.NO_ADAPTER} for the base model (no adapter)"
        )
    single = len(prompts) == 1
    pieces: dict[int, list[str]] = {}

    def on_token(event: TokenEvent) -> None:
        """One prompt: text as it comes. Several: each row's line as soon as it finishes."""
        if single:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            return
        pieces.setdefault(event.row, []).append(event.text)
        if event.finished:
            click.echo(f"[{event.row}] {''.join(pieces.pop(event.row))}")

    result = loaded.generate(
        list(prompts),
        adapters=names,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_strings=stop_strings,
        chat_template=not no_chat_template,
        system_prompt=system_prompt,
        stream=on_token if stream and not as_json else None,
    )
    if stream and not as_json:
        if single:
            sys.stdout.write("\n")
        return
    for i, row in enumerate(result.rows):
        if as_json:
            record = {
                "prompt": prompts[i],
                "adapter": names[i % len(names)] if names else None,
                "text": row.text,
                "token_ids": row.token_ids,
                "finish_reason": row.finish_reason,
            }
            click.echo(json.dumps(record, ensure_ascii=False))
        elif single:
            click.echo(row.text)
        else:
            click.echo(f"[{i}] {row.text}")
