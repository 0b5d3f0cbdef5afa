"""The ``anoddpm`` command line: the parser (``parser``), the entry point and one-line errors (``app``) and one thin
module per verb (``synth``, ``train``, ``calibrate``, ``evaluate``, ``score``, ``info``; ``export`` and ``inspect`` live
in deploy/). ``anoddpm.cli:main`` is the console script."""
from anoddpm.cli.app import main

__all__ = ["main"]
