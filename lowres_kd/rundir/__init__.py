"""What a run directory holds on disk: atomic safetensors checkpoints and the run's lock."""
