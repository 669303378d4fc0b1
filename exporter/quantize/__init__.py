"""Weight-only block quantization of the base's linear layers (QLoRA's deployment form).

`blocks` holds the one in-memory form every source produces (ONNX Runtime's quantizer, or a
GGUF file's own blocks); `apply` puts the dequantized weights into the PyTorch model so that
tracing, DoRA's magnitude ratio and `verify`'s reference all see exactly what the graph
computes; `graph` swaps the traced graph's float weights for the quantized form.
"""
