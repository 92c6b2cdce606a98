"""``fsck`` of the store: do the index and the chunk files agree? Repair follows the files.

Part of ``Store`` (``cas.py``), kept apart because it is the one walk over
everything: ``FsckMixin`` is mixed into ``Store`` and uses its files, index and lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from p2pfs.errors import CorruptChunk, MissingChunk
from p2pfs.fsutil import token_alive
from p2pfs.ids import ChunkId, matches

from .index import Index, Intent

if TYPE_CHECKING:
    from .quota import Quota

log = logging.getLogger(__name__)

FSCK_MAX_LINES = 100  # findings listed one by one in a report; the counts are always whole


@dataclass
class FsckReport:
    """What ``Store.fsck`` found and, with ``repair``, did. Counts are findings."""

    repair: bool
    files: int = 0  # chunk files looked at
    rows: int = 0  # index rows looked at
    verified: int = 0  # files whose hash was checked
    unindexed: int = 0  # files without an index row
    missing: int = 0  # index rows without a file
    size_mismatches: int = 0  # row size differs from the file's
    corrupt: int = 0  # files whose bytes do not hash to their name
    stray: int = 0  # entries in chunks/ not named by an id in its place
    temp_files: int = 0  # temp files of writers that are gone
    stale_intents: int = 0  # unfinished puts and evictions of writers that are gone
    counters: int = 0  # totals or pin counts that disagreed with a recount
    findings: list[str] = field(default_factory=list)  # the first FSCK_MAX_LINES, one each

    @property
    def clean(self) -> bool:
        return not (
            self.unindexed
            or self.missing
            or self.size_mismatches
            or self.corrupt
            or self.stray
            or self.temp_files
            or self.stale_intents
            or self.counters
        )

    def note(self, text: str) -> None:
        if len(self.findings) < FSCK_MAX_LINES:
            self.findings.append(text)
        elif len(self.findings) == FSCK_MAX_LINES:
            self.findings.append("... (more findings not listed; the counts are complete)")

    def lines(self) -> list[str]:
        checked = f"checked {self.files} files and {self.rows} index rows"
        checked += f", verified {self.verified}" if self.verified else " (hashes not verified)"
        out = [checked]
        for count, what in (
            (self.unindexed, "files not in the index"),
            (self.missing, "index rows without a file"),
            (self.size_mismatches, "size mismatches"),
            (self.corrupt, "corrupt files (hash mismatch)"),
            (self.stray, "stray entries in chunks/"),
            (self.temp_files, "leftover temp files"),
            (self.stale_intents, "unfinished puts or evictions of a dead writer"),
            (self.counters, "wrong totals or pin counts"),
        ):
            if count:
                out.append(f"{count} {what}")
        out.extend(f"  {line}" for line in self.findings)
        if self.clean:
            out.append("clean: the index and the files agree")
        elif self.repair:
            out.append("repaired: the index now follows the files")
        else:
            out.append("not repaired (run with repair to make the index follow the files)")
        return out


class FsckMixin:
    """Store.fsck and its walk, and Store.scrub; everything else they use is the store's."""

    if TYPE_CHECKING:
        root: Path
        chunks_dir: Path
        quarantine_dir: Path
        index: Index
        quota: Quota
        _lock: threading.RLock

        def _dead_temp_files(self) -> list[Path]: ...
        def _recover(self, intents: list[Intent] | None = None) -> list[str]: ...
        def _id_of(self, path: Path) -> bytes | None: ...
        def _quarantine(self, path: Path, cid: bytes | None) -> None: ...
        def _now(self) -> int: ...
        def path_of(self, cid: bytes) -> Path: ...
        def _chunk_files(self) -> Iterable[Path]: ...
        def _read(self, cid: bytes) -> bytes: ...

    def scrub(self) -> tuple[int, list[ChunkId]]:
        """Verify every stored file; quarantine the bad ones. Returns (good, bad ids).

        Does not count as use: the LRU order is left alone."""
        good = 0
        bad: list[ChunkId] = []
        for path in list(self._chunk_files()):
            cid = self._id_of(path)
            if cid is None:
                continue
            try:
                self._read(cid)
            except CorruptChunk:
                bad.append(ChunkId(cid))
            except MissingChunk:
                continue
            else:
                good += 1
        return good, bad

    def fsck(self, *, repair: bool, verify: bool = True) -> FsckReport:
        """Compare the index with the files; with ``repair``, make the index follow them.

        Finds files without a row (repair: verify and index them), rows without
        a file (drop them), sizes that disagree (verify the file: fix the row or
        quarantine), files that fail their hash (with ``verify``, the default:
        quarantine), stray entries in chunks/ (quarantine), temp files and
        unfinished intents of dead writers (finish them), and totals or pin
        counts that disagree with a recount (recount). Ids a live writer is
        working on are skipped; each finding is re-checked under the store's
        lock before it is reported, so fsck can run while the store is in use.
        Walks the files and the index rows side by side in id order (one shard
        directory and one batch of rows in memory at a time).
        """
        report = FsckReport(repair)
        for p in self._dead_temp_files():
            report.temp_files += 1
            report.note(f"temp file {p.name} of a writer that is gone" + (" removed" * repair))
            if repair:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        stale = [i for i in self.index.intents() if not token_alive(i.owner)]
        report.stale_intents = len(stale)
        if repair:
            for line in self._recover(stale):
                report.note(line)
        else:
            for i in stale:
                report.note(f"{i.id.hex()}: unfinished {i.op} of a writer that is gone")
        busy = {i.id for i in stale}
        files = self._walk_ids(report)
        rows = self.index.iter_chunks()
        f, r = next(files, None), next(rows, None)
        while f is not None or r is not None:
            if r is None or (f is not None and f[0] < r[0]):
                assert f is not None
                if f[0] not in busy:
                    self._fsck_unindexed(f[0], f[1], report)
                f = next(files, None)
                continue
            report.rows += 1
            if f is None or r[0] < f[0]:
                if r[0] not in busy:
                    self._fsck_missing(r[0], report)
            else:
                self._fsck_pair(f[1], r[0], r[1], verify, report)
                f = next(files, None)
            r = next(rows, None)
        for line in self.index.check_totals(repair):
            report.counters += 1
            report.note(line + (" (recounted)" if repair else ""))
        if repair and report.unindexed:
            self.quota.fit()
        log.log(
            logging.INFO if report.clean else logging.WARNING,
            "fsck of %s: %s",
            self.root,
            "; ".join(report.lines()[1:3]),
        )
        return report

    def _walk_ids(self, report: FsckReport) -> Iterator[tuple[bytes, Path]]:
        """(id, path) of the chunk files in id order; strays are noted (and quarantined)."""

        def shard(p: Path) -> bool:
            return p.is_dir() and len(p.name) == 2 and all(c in "0123456789abcdef" for c in p.name)

        for d1 in sorted(self.chunks_dir.iterdir()):
            if not shard(d1):
                self._fsck_stray(d1, report)
                continue
            for d2 in sorted(d1.iterdir()):
                if not shard(d2):
                    self._fsck_stray(d2, report)
                    continue
                for p in sorted(d2.iterdir()):
                    cid = self._id_of(p)
                    if cid is None or not p.is_file():
                        self._fsck_stray(p, report)
                        continue
                    report.files += 1
                    yield cid, p

    def _fsck_stray(self, path: Path, report: FsckReport) -> None:
        report.stray += 1
        rel = path.relative_to(self.root)
        if not report.repair:
            report.note(f"{rel}: not a chunk file in its place")
            return
        dest = self.quarantine_dir / f"stray-{path.name}.{time.time_ns()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, dest)
        report.note(f"{rel}: not a chunk file in its place; moved to quarantine/{dest.name}")

    def _fsck_unindexed(self, cid: bytes, path: Path, report: FsckReport) -> None:
        with self._lock:
            if not path.exists() or self.index.has_chunk(cid) or self.index.has_intent(cid):
                return  # a put or an eviction got there meanwhile
            report.unindexed += 1
            if not report.repair:
                report.note(f"{cid.hex()}: file not in the index")
                return
            data = path.read_bytes()
            if not matches(cid, data):
                self._quarantine(path, cid)
                report.note(f"{cid.hex()}: file not in the index and corrupt; quarantined")
                return
            self.index.add_chunks([(cid, len(data), "fsck")], self._now())
            report.note(f"{cid.hex()}: file not in the index; verified and indexed")

    def _fsck_missing(self, cid: bytes, report: FsckReport) -> None:
        with self._lock:
            if self.path_of(cid).exists() or not self.index.has_chunk(cid):
                return
            report.missing += 1
            if report.repair:
                self.index.remove_chunk(cid)
            report.note(f"{cid.hex()}: index row without a file" + (" dropped" * report.repair))

    def _fsck_pair(
        self, path: Path, cid: bytes, size: int, verify: bool, report: FsckReport
    ) -> None:
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return  # evicted meanwhile
        if actual != size:
            with self._lock:
                size_now = self.index.chunk_size(cid)
                try:
                    actual = path.stat().st_size
                except FileNotFoundError:
                    return
                if size_now is None or size_now == actual:
                    return
                report.size_mismatches += 1
                what = f"{cid.hex()}: index says {size_now} bytes, file has {actual}"
                if not report.repair:
                    report.note(what)
                    return
                data = path.read_bytes()
                if matches(cid, data):
                    self.index.set_size(cid, len(data))
                    report.note(what + "; file verified, row fixed")
                else:
                    self._quarantine(path, cid)
                    report.note(what + "; file corrupt, quarantined")
            return
        if not verify:
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        report.verified += 1
        if matches(cid, data):
            return
        with self._lock:
            try:
                if matches(cid, path.read_bytes()):
                    return  # replaced by a good copy meanwhile
            except FileNotFoundError:
                return
            report.corrupt += 1
            if report.repair:
                self._quarantine(path, cid)
            report.note(
                f"{cid.hex()}: bytes do not match the id" + (" quarantined" * report.repair)
            )
