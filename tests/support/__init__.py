"""Helpers shared by the tests and the bench scripts: stand-in servers (hub, S3, hostile
hosts), clients, audio makers and server runners. Not fixtures: those live in conftest.py.

Importable as `support` because `tests/` is on the path: pytest's `pythonpath` setting
(pyproject.toml) for the tests, PYTHONPATH=tests for the bench scripts (the Makefile and
the tests that run them set it).
"""
