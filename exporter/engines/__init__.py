"""TensorRT engine builds (TensorRT or TensorRT-RTX), profiles, cache and refit."""
