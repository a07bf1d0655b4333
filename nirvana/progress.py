"""One-line status messages on stderr for steps that take seconds but have no natural bar."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def status(message: str, enabled: bool = True):
    """Print ``message ...`` on stderr, then ``done (N s)`` on the same line when the block ends.

    Nothing is printed when ``enabled`` is false (``--quiet``). A block that raises ends the line with
    ``failed`` so the error that follows starts on a line of its own.
    """
    if not enabled:
        yield
        return
    print(f"{message} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


__all__ = ["status"]
