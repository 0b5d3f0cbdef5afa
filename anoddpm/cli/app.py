"""The entry point of the ``anoddpm`` console script: parse, route logging to stderr, run the verb's handler (imported
only when it runs, so ``inspect`` and ``info`` on an ONNX file need no torch) and turn failures into one line."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable, Sequence

from anoddpm.cli.parser import DEBUG_ENV, build_parser


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (not the one at set-up), beside tqdm's bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Route the anoddpm, eval, deploy and noise loggers to stderr: INFO by default, WARNING with -q, DEBUG with -v."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    for name in ("anoddpm", "eval", "deploy", "noise"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _StderrHandler)] + [handler]
        logger.setLevel(level)


def _load_handler(spec: str) -> Callable[[argparse.Namespace], int | None]:
    import importlib

    module_name, func_name = spec.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anoddpm` console script; returns the exit code (0 done, 1 failed, 2 bad input or
    usage, 130 interrupted). Errors are one line; the traceback only with --debug or ANODDPM_DEBUG=1."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 are printed, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(_load_handler(args.handler)(args) or 0)
    except KeyboardInterrupt:
        print(f"anoddpm {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line unless debugging
        if debug:
            raise
        code, text = error_line(err)
        print(f"anoddpm {args.verb}: error: {text}", file=sys.stderr)
        return code


def error_line(err: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error: 2 for bad input or usage, 1 for everything else."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return 2, " ".join(str(err).split())
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return 1, f"disk full{where}; free space and run again (results written before are kept)"
        return 1, f"{err.strerror or err}{where}"
    text = " ".join(str(err).split())[:300]
    return 1, f"unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
