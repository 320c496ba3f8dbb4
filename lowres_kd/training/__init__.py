"""The trainer, its engines, its logs and the process group it runs in."""
