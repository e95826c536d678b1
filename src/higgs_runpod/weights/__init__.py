"""The model on the volume: download, checks, the lock, tiny test checkpoints."""
