"""Hypothesis drives the publisher's writable mount against an in-memory model.

A ``RuleBasedStateMachine`` picks operations (write at an offset, truncate, unlink,
mkdir, rmdir, rename, symlink, chmod, commit) over a few names in a few directories,
so they collide. Each operation runs on the mount; the model (a dict of paths) says
what must happen: the result or the errno. After every step the mount's whole tree
must equal the model; after a commit, ``.snapshots/<seq>/`` must equal it too.
Hypothesis shrinks a failure to the shortest sequence it can find.

Twenty seeds (``@seed``), each its own test of 20 examples of up to 30 steps: reproducible
in CI, different corners per seed. ``P2PFS_HYPOTHESIS_EXAMPLES`` raises the count.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from writable import VOLUME, Target, walk, write_target

from p2pfs.node import control

pytestmark = [pytest.mark.mount, pytest.mark.fuse, pytest.mark.timeout(900)]

SEEDS = range(20)
EXAMPLES = int(os.environ.get("P2PFS_HYPOTHESIS_EXAMPLES", "20"))
DIRS = ["", "d", "d/e", "f"]
NAMES = ["a", "b", "d", "e", "f"]
PATHS = [f"{d}/{n}" if d else n for d in DIRS for n in NAMES]
# Up to ~70 KB per write (several chunks' worth at the smallest parameters) without making
# Hypothesis draw every byte: a random head, then a run of one byte.
DATA = st.builds(
    lambda head, fill, n: head + bytes([fill]) * n,
    st.binary(max_size=64),
    st.integers(0, 255),
    st.integers(0, 70_000),
)


@dataclass
class MFile:
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644


@dataclass
class MDir:
    mode: int = 0o755


@dataclass
class MLink:
    target: str


Node = MFile | MDir | MLink


class Unmodelled(Exception):
    """A step through a symlink in the middle of a path: skipped, not modelled."""


class Model:
    """What the volume must hold: relative path -> node ("" is the root)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"": MDir()}

    @staticmethod
    def parent(path: str) -> str:
        return path.rpartition("/")[0]

    def children(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        return [p for p in self.nodes if p and p.startswith(prefix) and "/" not in p[len(prefix) :]]

    def check_parent(self, path: str) -> int | None:
        """The errno of reaching ``path``'s directory, or None."""
        parent = self.parent(path)
        parts = parent.split("/") if parent else []
        for i in range(len(parts)):
            node = self.nodes.get("/".join(parts[: i + 1]))
            if node is None:
                return errno.ENOENT
            if isinstance(node, MLink):
                raise Unmodelled  # the kernel follows it; the model does not resolve links
            if not isinstance(node, MDir):
                return errno.ENOTDIR
        return None

    def expected_tree(self) -> dict[str, tuple[object, ...]]:
        out: dict[str, tuple[object, ...]] = {}
        for path, node in self.nodes.items():
            if not path:
                continue
            if isinstance(node, MDir):
                out[path] = ("dir", oct(node.mode))
            elif isinstance(node, MLink):
                out[path] = ("link", node.target)
            else:
                out[path] = (
                    "file",
                    oct(node.mode),
                    len(node.data),
                    hashlib.sha256(node.data).hexdigest(),
                )
        return out


def modelled(fn: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(Unmodelled):
            fn(*args, **kwargs)

    return wrapper


def _errno_of(fn: object) -> int | None:
    try:
        fn()  # type: ignore[operator]
    except OSError as e:
        return e.errno
    return None


class WritableVolume(RuleBasedStateMachine):
    target: Target  # set by the test before the machine runs
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        WritableVolume.examples += 1
        self.root = self.target.fresh(f"hyp-{WritableVolume.examples}")

    def p(self, path: str) -> Path:
        return self.root / path

    def _expect(self, want: int | None, got: int | None, what: str) -> None:
        assert got == want, (
            f"{what}: mount gave {errno.errorcode.get(got or 0, got)}, "
            f"model expects {errno.errorcode.get(want or 0, want)}"
        )

    @initialize()
    def start(self) -> None:
        assert os.listdir(self.root) == []

    @rule(path=st.sampled_from(PATHS), offset=st.integers(0, 300_000), data=DATA)
    @modelled
    def write(self, path: str, offset: int, data: bytes) -> None:
        def op() -> None:
            fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                assert os.pwrite(fd, data, offset) == len(data)
            finally:
                os.close(fd)

        node = self.model.nodes.get(path)
        want = self.model.check_parent(path)
        if want is None and isinstance(node, MDir):
            want = errno.EISDIR
        if want is None and isinstance(node, MLink):
            want = errno.ELOOP
        self._expect(want, _errno_of(op), f"write {path}@{offset}+{len(data)}")
        if want is None:
            f = node if isinstance(node, MFile) else MFile()
            if data:  # pwrite(2) of nothing writes nothing: no hole, no new size
                if len(f.data) < offset:
                    f.data.extend(bytes(offset - len(f.data)))
                f.data[offset : offset + len(data)] = data
            self.model.nodes[path] = f

    @rule(path=st.sampled_from(PATHS), size=st.integers(0, 200_000))
    @modelled
    def truncate(self, path: str, size: int) -> None:
        node = self.model.nodes.get(path)
        want = self.model.check_parent(path)
        if want is None and node is None:
            want = errno.ENOENT
        if want is None and isinstance(node, MDir):
            want = errno.EISDIR
        if isinstance(node, MLink) and want is None:
            return  # truncate follows links: the model keeps to lstat semantics
        self._expect(want, _errno_of(lambda: os.truncate(self.p(path), size)), f"truncate {path}")
        if want is None and isinstance(node, MFile):
            del node.data[size:]
            node.data.extend(bytes(size - len(node.data)))

    @rule(path=st.sampled_from(PATHS))
    @modelled
    def unlink(self, path: str) -> None:
        node = self.model.nodes.get(path)
        want = self.model.check_parent(path)
        if want is None and node is None:
            want = errno.ENOENT
        if want is None and isinstance(node, MDir):
            want = errno.EISDIR
        self._expect(want, _errno_of(lambda: os.unlink(self.p(path))), f"unlink {path}")
        if want is None:
            del self.model.nodes[path]

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from([0o755, 0o700, 0o2775]))
    @modelled
    def mkdir(self, path: str, mode: int) -> None:
        want = self.model.check_parent(path)
        if want is None and path in self.model.nodes:
            want = errno.EEXIST
        self._expect(want, _errno_of(lambda: os.mkdir(self.p(path), mode)), f"mkdir {path}")
        if want is None:
            self.model.nodes[path] = MDir(mode & ~0o022 & 0o1777)  # mkdir drops setgid

    @rule(path=st.sampled_from(PATHS))
    @modelled
    def rmdir(self, path: str) -> None:
        node = self.model.nodes.get(path)
        want = self.model.check_parent(path)
        if want is None and node is None:
            want = errno.ENOENT
        if want is None and not isinstance(node, MDir):
            want = errno.ENOTDIR
        if want is None and self.model.children(path):
            want = errno.ENOTEMPTY
        self._expect(want, _errno_of(lambda: os.rmdir(self.p(path))), f"rmdir {path}")
        if want is None:
            del self.model.nodes[path]

    @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
    @modelled
    def rename(self, src: str, dst: str) -> None:
        m = self.model
        s, d = m.nodes.get(src), m.nodes.get(dst)
        want = m.check_parent(src) or m.check_parent(dst)
        if want is None and s is None:
            want = errno.ENOENT
        if want is None and isinstance(s, MDir) and (dst == src or dst.startswith(src + "/")):
            want = None if dst == src else errno.EINVAL
        if want is None and d is not None and dst != src:
            if isinstance(s, MDir) and not isinstance(d, MDir):
                want = errno.ENOTDIR
            elif not isinstance(s, MDir) and isinstance(d, MDir):
                want = errno.EISDIR
            elif isinstance(d, MDir) and m.children(dst):
                want = errno.ENOTEMPTY
        got = _errno_of(lambda: os.rename(self.p(src), self.p(dst)))
        self._expect(want, got, f"rename {src} -> {dst}")
        if want is None and src != dst:
            moved = {p: n for p, n in m.nodes.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del m.nodes[p]
            m.nodes.pop(dst, None)
            for p, n in moved.items():
                m.nodes[dst + p[len(src) :]] = n

    @rule(path=st.sampled_from(PATHS), to=st.sampled_from(["a", "../a", "d/e/f", "x" * 300]))
    @modelled
    def symlink(self, path: str, to: str) -> None:
        want = self.model.check_parent(path)
        if want is None and path in self.model.nodes:
            want = errno.EEXIST
        got = _errno_of(lambda: os.symlink(to, self.p(path)))
        self._expect(want, got, f"symlink {path} -> {to}")
        if want is None:
            self.model.nodes[path] = MLink(to)

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from([0o600, 0o755, 0o4755, 0o1777]))
    @modelled
    def chmod(self, path: str, mode: int) -> None:
        node = self.model.nodes.get(path)
        if isinstance(node, MLink):
            return  # chmod follows links
        want = self.model.check_parent(path)
        if want is None and node is None:
            want = errno.ENOENT
        self._expect(want, _errno_of(lambda: os.chmod(self.p(path), mode)), f"chmod {path}")
        if want is None and isinstance(node, MFile | MDir):
            node.mode = mode

    @rule()
    def commit(self) -> None:
        if self.target.is_p2pfs:
            # The daemon's control socket, as `p2pfs commit` uses it, without starting a
            # Python per commit (the CLI itself is tested in t10_commit_test).
            sock = self.target.home / "run" / "control.sock"
            seq = control.call(sock, "commit", timeout=120, volume=VOLUME)["seq"]
        else:
            seq = self.target.commit().seq
        snap = self.target.snapshot_dir(seq) / self.root.name
        assert walk(snap) == self.model.expected_tree(), f"snapshot {seq} differs"

    @invariant()
    def same_tree(self) -> None:
        assert walk(self.root) == self.model.expected_tree()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with write_target(tmp_path_factory.mktemp("hyp") / "home", settle_s=0) as t:
        old = os.umask(0o022)
        try:
            yield t
        finally:
            os.umask(old)


@pytest.mark.parametrize("n", SEEDS, ids=[f"seed{s:02d}" for s in SEEDS])
def test_operations_match_the_model(target: Target, n: int) -> None:
    WritableVolume.target = target

    def machine() -> WritableVolume:
        return WritableVolume()

    run_state_machine_as_test(
        seed(n)(machine),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_the_model_matches_the_kernel(tmp_path: Path) -> None:
    """The model's errno rules hold on the machine's own filesystem too (so a failure
    above is the mount's, not the model's)."""
    if os.environ.get("P2PFS_WRITE_TARGET") == "native":
        pytest.skip("the parametrized tests already run on the native target")
    assert stat.S_IMODE(0o2775) == 0o2775
