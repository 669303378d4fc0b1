"""The export pipeline: load base + adapters, build the decoder graph, write bundles.

Imports torch, transformers and peft; the runtime never imports this package.
"""
