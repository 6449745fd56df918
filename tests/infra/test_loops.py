"""A loop step's failure is logged once with its reason, retried with a growing wait, and its recovery said once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from privads.infra.loops import Step, reason_of


def test_a_failing_step_is_logged_once_per_reason_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.loops")
    step = Step("reading the thing", log, base_s=1.0, max_s=5.0)
    assert step.due() and not step.failing
    caplog.set_level(logging.DEBUG, logger="test.loops")
    waits = [step.failed(FileNotFoundError("gone")) for _ in range(6)]
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]  # doubled up to max_s
    assert not step.due() and step.failing and step.reason == "FileNotFoundError: gone"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reading the thing failed (FileNotFoundError: gone)" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None  # the first one with its traceback
    step.failed(PermissionError("denied"))  # another reason: said again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "PermissionError: denied" in warnings[1].getMessage()
    step.succeeded()
    assert step.due() and not step.failing and step.reason is None
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["reading the thing works again (after 7 failed attempts)"]
    step.succeeded()  # working steps say nothing
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1


def test_run_skips_a_step_until_its_backoff_has_passed() -> None:
    step = Step("flaky", logging.getLogger("test.loops"), base_s=0.2, max_s=0.2)
    calls: list[int] = []

    async def fail() -> None:
        calls.append(1)
        raise OSError("down")

    async def main() -> list[bool]:
        out = [await step.run(fail), await step.run(fail)]  # the second is not due yet: not called
        await asyncio.sleep(0.25)
        out.append(await step.run(fail))
        return out

    assert asyncio.run(main()) == [False, False, False]
    assert len(calls) == 2 and step.failures == 2


def test_run_lets_cancellation_through() -> None:
    step = Step("cancelled", logging.getLogger("test.loops"))

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(step.run(cancelled))
    assert not step.failing


def test_reason_of_is_one_line() -> None:
    assert reason_of(ValueError("bad\nmore detail")) == "ValueError: bad"
    assert reason_of(KeyError()) == "KeyError"
