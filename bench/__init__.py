"""Benchmarks of SPEC §11, run against the sandbox: `python -m bench` (see the README)."""
