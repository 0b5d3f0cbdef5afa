"""Shared fixtures: tiny configs and generated data, so tests need nothing outside the repo."""
