"""Prompt-side methods (prefix, prompt tuning, P-tuning, AdaptionPrompt) as graph inputs."""
