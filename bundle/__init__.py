"""The bundle format: the only contract between the exporter and the runtimes.

Pure Python + numpy + safetensors so that edge runtimes can import it. See
docs/bundle-format.md for the format itself.
"""

from peft_export.bundle.errors import BundleError, PeftExportError
from peft_export.bundle.manifest import SCHEMA_VERSION, Manifest, load_manifest

__all__ = ["SCHEMA_VERSION", "BundleError", "Manifest", "PeftExportError", "load_manifest"]
