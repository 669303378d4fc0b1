"""Runtime-mode LoRA family: PEFT adapters to bank tensors, the MultiLoRA op, bank inputs."""
