"""The ``anoddpm`` command line: the parser (``parser``), the entry point and one-line errors (``app``) and one thin
module per verb (``synth``, ``train``, ``calibrate``, ``evaluate``, ``score``, ``export``, ``inspect``, ``info``; the
last three need no torch for an ONNX file). ``anoddpm.cli:main`` is the console script."""
from anoddpm.cli.app import main

__all__ = ["main"]
