"""Trainer, checkpoints."""
