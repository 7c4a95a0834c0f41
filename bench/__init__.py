"""Benchmarks of the operator and the gateway on local control planes: `python -m bench` (docs/benchmarks.md)."""
