"""Encoder (BERT-family) export: task models, per-slot head banks and pooling.

Decoders go through exporter.pipeline's DecoderWrapper; encoders through `export_encoder`
(exporter/encoders/export.py), which reuses the same LoRA-bank extension, ONNX tracing and
bundle writing, and adds what only encoders have: task heads and pooled embeddings.
"""
