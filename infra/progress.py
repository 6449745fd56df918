"""Progress of the long commands, on stderr: what each is doing, how far, the rate (tqdm).

The CLI turns it on for the commands that can run longer than a few seconds (``cli/main.py``: not with
``--quiet``); their final JSON stays alone on stdout. Off (the default, e.g. in the services and in library
use), a bar is tqdm's disabled one: its updates cost nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_enabled = False


def enable(on: bool) -> None:
    """Show progress from now on (the CLI, once, at start-up), or not."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def bar(what: str, total: float | None = None, unit: str = "it", **kw: Any) -> tqdm:
    """A progress bar on stderr named ``what`` (a context manager; ``update(n)`` as work is done).

    On a terminal it redraws in place at most 10 times a second; into a file or a pipe it writes a line at most
    every 5 seconds, so a log of a long run stays readable.
    """
    tty = sys.stderr.isatty()
    return tqdm(desc=what, total=total, unit=unit, file=sys.stderr, disable=not _enabled, dynamic_ncols=tty,
                mininterval=0.1 if tty else 5.0, leave=True, **kw)


def stage(what: str) -> None:
    """One line on stderr saying what the command is doing now."""
    if _enabled:
        tqdm.write(f"privads: {what}", file=sys.stderr)
