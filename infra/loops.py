"""One step of a long-lived loop: its failure logged once with the reason, then retried with backoff.

The API's model and catalog follower (``ranker.service.Recommender.follow``), the
workers' timers (``streams.worker.run``) and the learner's loop (``learner.cycle.run_loop``)
each run several independent steps. A step that fails must neither stop the others
nor fill the log with one line per retry: ``Step`` remembers that it is failing,
logs the first failure (and a failure with another reason), waits longer before each
retry, up to ``max_s``, and logs once when the step works again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable


def reason_of(exc: BaseException) -> str:
    """One line naming an exception: its class and the first line of its message."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class Step:
    """A named step of a loop, with its failure state.

    Parameters
    ----------
    name : str
        What the step does, as the log says it ("heartbeat", "following the catalog").
    log : logging.Logger
        Where its failure and its recovery are logged.
    base_s, max_s : float
        The wait before the first retry, doubled per failure up to ``max_s``.
    """

    def __init__(self, name: str, log: logging.Logger, base_s: float = 1.0, max_s: float = 30.0) -> None:
        self.name = name
        self.log = log
        self.base_s = base_s
        self.max_s = max_s
        self.failures = 0
        self.reason: str | None = None  # the last failure's, while failing
        self.retry_at = 0.0  # time.monotonic() before which a failing step is not retried

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def due(self, now: float | None = None) -> bool:
        """Whether to run the step now: always when it works, after its backoff when it fails."""
        return (time.monotonic() if now is None else now) >= self.retry_at

    def succeeded(self) -> None:
        """The step worked: if it was failing, say once that it recovered."""
        if self.failures:
            self.log.info("%s works again (after %d failed attempts)", self.name, self.failures)
        self.failures, self.reason, self.retry_at = 0, None, 0.0

    def failed(self, exc: BaseException) -> float:
        """Record a failure; log it if it is the first (or its reason changed). Returns the wait before a retry."""
        reason = reason_of(exc)
        self.failures += 1
        wait = min(self.max_s, self.base_s * 2 ** min(self.failures - 1, 30))
        if reason != self.reason:
            # once per reason, not per retry: a dead dependency would otherwise log a line every second
            self.log.warning("%s failed (%s); retrying with backoff (up to %.0f s), logged again only if the reason "
                             "changes", self.name, reason, self.max_s, exc_info=self.failures == 1)
        else:
            self.log.debug("%s failed again (%d): %s", self.name, self.failures, reason)
        self.reason = reason
        self.retry_at = time.monotonic() + wait
        return wait

    async def run(self, fn: Callable[[], Awaitable[object]]) -> bool:
        """Run ``fn`` if due; False when it was not due or failed (recorded), True when it ran."""
        if not self.due():
            return False
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a step's failure is recorded; the loop goes on with the others
            self.failed(e)
            return False
        self.succeeded()
        return True


async def until_done(step: Step, fn: Callable[[], Awaitable[object]], stop: asyncio.Event) -> bool:
    """Run ``fn`` as ``step`` until it succeeds (True) or ``stop`` is set (False): for work that must not be skipped,
    such as a batch whose offsets are committed only once it is stored."""
    while not stop.is_set():
        if await step.run(fn):
            return True
        try:  # wait out the backoff, but wake up for a stop
            await asyncio.wait_for(stop.wait(), max(0.0, step.retry_at - time.monotonic()))
        except TimeoutError:
            pass
    return False


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base · 2^attempt)] (``attempt`` counts from 0).

    The jitter spreads retries that conflicted together (two workers, or a worker and a burst of erasures).
    """
    return (rng or random).uniform(0.0, min(cap_s, base_s * 2.0 ** min(attempt, 30)))
