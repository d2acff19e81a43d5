"""One way every ``fedunroll`` command reports an expected error: one line, exit code 2.

Expected errors are the user's to fix (bad input file, bad value, missing file, unreadable HDF5,
bad config); a traceback stays for everything else (a bug).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with ``"; "``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def guard(fn: Handler) -> Handler:
    """Wrap a command handler: expected user errors become ``fedunroll CMD: error: ...`` on
    stderr and exit code 2 (:class:`recon.data.DataError`, ``ValueError``, ``OSError`` such as
    a missing file or h5py's unreadable file, pydantic's ``ValidationError``)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from recon.data.checks import DataError

        try:
            return fn(args)
        except (DataError, ValueError, OSError, ValidationError) as exc:
            print(f"fedunroll {args.command}: error: {one_line(exc)}", file=sys.stderr)
            return 2

    return run
