"""Benchmarks that print one JSON line of figures each."""
