"""The lightweight runtime: loads bundles and generates, without torch/transformers/peft."""
