"""anoddpm: visual anomaly detection with partial diffusion and simplex noise.

Importing the package imports no torch: the line runtime (deploy/) shares its image code.
"""
__version__ = "0.1.0"
BUNDLE_FORMAT_VERSION = 1
