"""Status lines on stderr for steps that take seconds but have no natural bar, and other libraries' bars."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def status(message: str, enabled: bool = True):
    """Print ``message ...`` on stderr, then ``message: done (N s)`` when the block ends without an error.

    Two whole lines rather than one finished in place: other libraries' bars (transformers' shard writer)
    may print in between. Nothing is printed when ``enabled`` is false (``--quiet``).
    """
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    # tqdm.write lifts any open bar (the calibration sets' one, say) above the line instead of running into it.
    tqdm.write(f"{message} ...", file=sys.stderr)
    start = time.perf_counter()
    yield
    tqdm.write(f"{message}: done ({time.perf_counter() - start:.1f} s)", file=sys.stderr)


@contextmanager
def library_bars(enabled: bool):
    """transformers' own progress bars (weight loading, shard writing) off inside the block unless ``enabled``;
    the global setting is restored on exit."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was:
            hf_logging.enable_progress_bar()


__all__ = ["library_bars", "status"]
