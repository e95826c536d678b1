"""The image's own commands; standard library only (they run before the runtime)."""
