"""Verified chunks handed to the kernel's page cache after a random read.

A chunk is read and hashed whole whatever part of it was asked for: BLAKE3 verifies
a chunk, not a page. A sequential reader's next requests cover the rest of it, but a
random reader (a database, a VM image, a package index) asks for 4 KiB at a time,
and each request used to be a trip through the daemon that served 4 KiB of a chunk
it already held. So after a random read the pages of the chunks it touched go to the
kernel (FUSE_NOTIFY_STORE, on a thread of the mount's own, see ``fuse.PagePusher``):
the next reads in those chunks are page-cache hits, as on a local disk.

Only a snapshot's files, whose content under an inode never changes (they are opened
with keep_cache), and only whole pages inside one chunk, so that every byte handed
over is one the chunk's hash verified. The kernel may drop the pages again under
memory pressure; then reads come back to the daemon, as without this.
"""

from __future__ import annotations

import mmap
import time
from collections import OrderedDict
from collections.abc import Callable

from p2pfs.volume.content import ChunkCache, FileLayout

PAGE = mmap.PAGESIZE
# A chunk handed over this recently is not handed over again: concurrent readers of it
# reach us before the kernel holds its pages.
AGAIN_AFTER_S = 1.0
MAX_RECENT = 4096

# (inode, offset, bytes): queue them for the kernel; must not block. False: not queued
# (the thread handing pages over is behind), so a later read offers the chunk again.
PagePush = Callable[[int, int, memoryview], bool]


class PageOffers:
    """Hands the chunks a random read touched to the page cache.

    A read reaches us only for pages the kernel lacks. One inside the part of a chunk
    that was handed over means the kernel dropped those pages (memory pressure,
    ``posix_fadvise(DONTNEED)``), so the chunk is handed over again; one of the pages
    at a chunk's edges, which are never handed over (they hold bytes of two chunks),
    is answered alone.
    """

    def __init__(self, push: PagePush, clock: Callable[[], float] = time.monotonic) -> None:
        self.push = push
        self.clock = clock
        self._recent: OrderedDict[tuple[int, int], float] = OrderedDict()

    def after_random_read(
        self, ino: int, layout: FileLayout, chunks: ChunkCache, offset: int, end: int
    ) -> None:
        """The read of ``offset``..``end`` is answered: offer the chunks it touched."""
        now = self.clock()
        for i in range(layout.index_of(offset), layout.index_of(end - 1) + 1):
            start, stop = layout.start_of(i), layout.ends[i]
            first = -(-start // PAGE) * PAGE
            # The file's last page is whole once it reaches the end of the file.
            last = stop if stop == layout.size else stop // PAGE * PAGE
            if max(first, offset) >= min(last, end):
                continue  # only edge pages of this chunk were read
            key = (ino, i)
            when = self._recent.get(key)
            if when is not None and now - when < AGAIN_AFTER_S:
                continue
            data = chunks.peek(layout.ids[i])
            if data is None:
                continue
            if not self.push(ino, first, memoryview(data)[first - start : last - start]):
                return
            self._recent[key] = now
            self._recent.move_to_end(key)
            if len(self._recent) > MAX_RECENT:
                self._recent.popitem(last=False)
