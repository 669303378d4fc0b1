"""Inference backends: each a loader plus a runner behind one small interface (base.py).

Backends are named here and imported only when chosen, so a box without TensorRT never
imports it. A new backend is one entry in BACKENDS: "module:Class", a `Backend` subclass whose
`from_bundle(root, manifest, **options)` loads it.
"""

from __future__ import annotations

BACKENDS: dict[str, str] = {
    "ort": "peft_export.runtime.backends.ort:OrtBackend",
    "trt": "peft_export.runtime.backends.trt:TrtBackend",
}
