"""Hosts on one machine for tests, benchmarks and the demo (never imported by the product)."""
