"""Benchmarks and load tests of Sluice; `python -m loadtest run` drives a running service and writes a report."""
