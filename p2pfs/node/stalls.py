"""Noticing an event loop that stopped: one blocking call delays every peer and reader.

Every network deadline here counts silence (``net/connection.py``): a loop that does
not run for a few seconds reads no bytes, so each fetch and connection it holds sees
silence that was never on the wire. Such a stall is a bug (disk or CPU work belongs
in a worker thread), and a rare one that shows up only on a busy machine; so a thread
of its own watches the loop's heartbeat and logs where the loop stood while it was
late, with the stack that names the culprit.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

import trio

log = logging.getLogger(__name__)

BEAT_S = 0.1  # the loop's heartbeat
STALL_S = 1.0  # a heartbeat this late is a stall
STACK_FRAMES = 12  # innermost frames logged


class StallWatch:
    def __init__(self, threshold_s: float = STALL_S) -> None:
        self.threshold_s = threshold_s
        self.stalls = 0  # stalls seen (``status``)
        self.longest_s = 0.0
        self._beat = time.monotonic()
        self._loop_thread = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._loop_thread = threading.get_ident()
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(stop,), name="stall-watch", daemon=True
        )
        self._beat = time.monotonic()
        watcher.start()
        task_status.started()
        try:
            while True:
                self._beat = time.monotonic()
                await trio.sleep(BEAT_S)
        finally:
            stop.set()

    def _watch(self, stop: threading.Event) -> None:
        reported = 0.0  # the beat last reported: one warning per stall
        while not stop.wait(BEAT_S):
            beat = self._beat
            late = time.monotonic() - beat - BEAT_S
            if late < self.threshold_s or beat == reported:
                continue
            reported = beat
            frame = sys._current_frames().get(self._loop_thread)
            where = "".join(traceback.format_stack(frame)[-STACK_FRAMES:]) if frame else "?\n"
            # Still stalled: wait for its end, to say how long it was.
            while self._beat == beat and not stop.wait(BEAT_S / 2):
                pass
            late = max(late, time.monotonic() - beat - BEAT_S)
            self.stalls += 1
            self.longest_s = max(self.longest_s, late)
            log.warning("the event loop was blocked for %.1f s; it stood in:\n%s", late, where)
