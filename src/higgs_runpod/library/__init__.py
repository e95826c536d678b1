"""The voice library on the volume, and managing it."""
