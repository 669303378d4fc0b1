"""peft-export: deploy PEFT adapters as ONNX graphs and TensorRT engines.

The sub-packages map to the repository's top-level folders: `bundle` (the format shared by
exporter and runtimes), `exporter`, `runtime`, `plugins` and `models`.
"""

__version__ = "0.1.0"
