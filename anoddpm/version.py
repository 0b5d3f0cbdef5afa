"""The package version and the model-bundle format version it writes (imports nothing)."""

__version__ = "0.1.0"
BUNDLE_FORMAT_VERSION = 1
