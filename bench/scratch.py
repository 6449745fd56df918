"""The benches' scratch directory: removed when the bench succeeds, kept (and named) when it fails.

A bench writes a broker's and a redis-server's data, model versions and logs (hundreds of MB at 1M ads); left
behind after every run they filled ``/tmp``. Its logs matter only when it fails.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory for one bench run; removed after it unless the run raised."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    except BaseException:
        log.error("the bench failed; its logs and data are kept in %s", tmp)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
