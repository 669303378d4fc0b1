"""Multi-LoRA CUDA kernels and the TensorRT plugin (see plugins/multilora/README.md)."""
