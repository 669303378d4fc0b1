"""Decoder graph: the export wrapper, graph extensions and ONNX export."""
