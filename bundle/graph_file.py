"""Reading a bundle's graph with its external data (`model.onnx.data`) into memory.

onnx.load refuses external data files with more than one hard link (a guard against links
planted by someone else). A bundle's own files have two while `adapters add` or an engine
build works on a hard-linked copy of the bundle (bundle/atomic.py), so the graph is read here
instead: the data's location must stay inside the graph's folder (`confined`), and nothing
but that folder is read. `onnx` is imported lazily: the runtime needs it only to rewrite a
graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft_export.bundle.paths import confined


def load_graph(path: str | Path) -> Any:
    """The ModelProto at `path` with every externally stored tensor read in."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    handles: dict[Path, Any] = {}
    try:
        for tensor in _tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            file = confined(path.parent, info.get("location", ""))
            handle = handles.get(file) or handles.setdefault(file, open(file, "rb"))  # noqa: SIM115
            handle.seek(int(info.get("offset", 0)))
            length = info.get("length")
            tensor.raw_data = handle.read(int(length)) if length is not None else handle.read()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for handle in handles.values():
            handle.close()
    return model


def _tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)
