"""The stall watch: a blocking call on the event loop is logged with where it stood."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from p2pfs.node.stalls import StallWatch

pytestmark = pytest.mark.unit


def _block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # the culprit the log must name


def test_a_blocked_loop_is_logged_with_the_blocking_call(caplog: pytest.LogCaptureFixture) -> None:
    watch = StallWatch(threshold_s=0.3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.sleep(0.3)
            _block_the_loop_for(1.0)
            await trio.sleep(0.5)  # the watch sees the loop beat again
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="p2pfs.node.stalls"):
        trio.run(main)
    assert watch.stalls == 1
    assert watch.longest_s >= 0.6
    (record,) = [r for r in caplog.records if "blocked" in r.getMessage()]
    assert "_block_the_loop_for" in record.getMessage()


def test_a_loop_that_awaits_is_not_a_stall() -> None:
    watch = StallWatch(threshold_s=2.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            for _ in range(10):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert watch.stalls == 0
