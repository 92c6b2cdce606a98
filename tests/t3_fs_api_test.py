"""The FUSE adapter's Operations driven without a mount (S3QL's t3_fs_api is the model).

The calls the kernel would make go straight to ``fuse.Operations`` over a real store,
a snapshot volume and a writable one: what each answers (errno, cache policy,
attributes) is checked where the filesystem layer decides it, with no FUSE involved.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest

from p2pfs.config import Config
from p2pfs.errors import P2pfsError
from p2pfs.fs.api import BLOCK_SIZE
from p2pfs.fs.fuse import Operations
from p2pfs.fs.vfs import ROOT_INO, FileSystem, Head
from p2pfs.home import Home
from p2pfs.node.live import LiveVolumes
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.importer import Importer
from p2pfs.volume.registry import VolumeRegistry

pytestmark = pytest.mark.unit


@dataclass
class Ctx:
    """What a handler reads of pyfuse3.RequestContext."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


CTX = Ctx()


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = Home(root / "home")
        self.home.init()
        self.store = Store(self.home.store_dir)
        self.registry = VolumeRegistry(self.home)
        self.heads: dict[str, Head] = {}
        self.content = Content(self.store, chunk_cache_bytes=1 << 20)
        self.fs = FileSystem(self.content, lambda: self.heads)
        self.ops = Operations(self.fs)
        self.live: LiveVolumes | None = None

    def publish(self, name: str, files: dict[str, bytes]) -> None:
        src = self.root / f"src-{name}"
        src.mkdir()
        for rel, data in files.items():
            (src / rel).write_bytes(data)
        if name not in self.registry.names():
            self.registry.create(name)
        Importer(self.store, self.registry, name).run(src)
        record = self.registry.get(name)
        snap = self.registry.load_head(self.store, record)
        assert snap is not None and record.head is not None
        self.heads[name] = Head(record.head, snap)

    async def writable(self) -> LiveVolumes:
        async def keep(name: str) -> bool:
            return True

        self.live = LiveVolumes(
            self.root / "work",
            self.registry,
            self.store,
            self.content,
            self.fs,
            Config(settle_s=0),
            lambda name: None,
            keep,
        )
        self.live.open()
        return self.live

    async def lookup(self, path: str) -> pyfuse3.EntryAttributes:
        ino = ROOT_INO
        attr = None
        for part in path.split("/"):
            attr = await self.ops.lookup(pyfuse3.InodeT(ino), pyfuse3.FileNameT(part.encode()), CTX)
            ino = attr.st_ino
        assert attr is not None
        return attr


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    if w.live is not None:
        w.live.close()
    w.store.close()


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


async def test_a_snapshot_answers_reads_and_refuses_every_change(world: World) -> None:
    world.publish("tools", {"a": b"hello"})
    ops = world.ops
    a = await world.lookup("tools/a")
    assert stat.S_ISREG(a.st_mode) and a.st_size == 5 and a.st_blksize == BLOCK_SIZE
    info = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    assert info.keep_cache  # immutable content: the kernel keeps its pages
    assert bytes(await ops.read(info.fh, 0, 100)) == b"hello"
    await ops.release(info.fh)
    tools = await world.lookup("tools")
    refusals = [
        ops.access(a.st_ino, os.W_OK, CTX),
        ops.open(a.st_ino, os.O_WRONLY, CTX),
        ops.mknod(tools.st_ino, pyfuse3.FileNameT(b"f"), stat.S_IFIFO | 0o644, 0, CTX),
        ops.mkdir(tools.st_ino, pyfuse3.FileNameT(b"d"), 0o755, CTX),
        ops.unlink(tools.st_ino, pyfuse3.FileNameT(b"a"), CTX),
        ops.setxattr(a.st_ino, pyfuse3.XAttrNameT(b"user.x"), b"1", CTX),
        ops.removexattr(a.st_ino, pyfuse3.XAttrNameT(b"user.x"), CTX),
    ]
    for call in refusals:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call
        assert fuse_errno(e) == errno.EROFS
    assert await ops.access(a.st_ino, os.R_OK, CTX)
    assert await ops.getxattr(a.st_ino, pyfuse3.XAttrNameT(b"user.p2pfs.id"), CTX)


async def test_a_writable_volume_through_the_adapter(world: World) -> None:
    world.publish("tools", {"a": b"old"})
    await world.writable()
    ops = world.ops
    tools = await world.lookup("tools")
    info, attr = await ops.create(
        tools.st_ino, pyfuse3.FileNameT(b"new"), 0o644, os.O_WRONLY | os.O_CREAT, CTX
    )
    # A new file's pages are all this kernel's writes: they may stay, and so on later opens.
    assert info.keep_cache and attr.st_blksize == BLOCK_SIZE
    assert await ops.write(info.fh, 0, b"fresh bytes") == 11
    await ops.release(info.fh)
    new = await world.lookup("tools/new")
    rd = await ops.open(new.st_ino, os.O_RDONLY, CTX)
    assert rd.keep_cache  # its bytes change only through the kernel, which keeps its pages
    assert bytes(await ops.read(rd.fh, 0, 100)) == b"fresh bytes"
    await ops.release(rd.fh)
    # Fifos and devices (with their number), user.* extended attributes.
    p = await ops.mknod(tools.st_ino, pyfuse3.FileNameT(b"p"), stat.S_IFIFO | 0o644, 0, CTX)
    assert stat.S_ISFIFO(p.st_mode) and p.st_rdev == 0
    dev = await ops.mknod(
        tools.st_ino, pyfuse3.FileNameT(b"c"), stat.S_IFCHR | 0o600, os.makedev(1, 3), CTX
    )
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert (await ops.getattr(dev.st_ino, CTX)).st_rdev == os.makedev(1, 3)
    reg = await ops.mknod(tools.st_ino, pyfuse3.FileNameT(b"r"), stat.S_IFREG | 0o600, 0, CTX)
    assert stat.S_ISREG(reg.st_mode)
    await ops.setxattr(new.st_ino, pyfuse3.XAttrNameT(b"user.x"), b"1", CTX)
    assert await ops.getxattr(new.st_ino, pyfuse3.XAttrNameT(b"user.x"), CTX) == b"1"
    assert b"user.x" in await ops.listxattr(new.st_ino, CTX)
    await ops.removexattr(new.st_ino, pyfuse3.XAttrNameT(b"user.x"), CTX)
    for name, code in [
        (b"user.x", errno.ENODATA),  # removed: removing it again
    ]:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.removexattr(new.st_ino, pyfuse3.XAttrNameT(name), CTX)
        assert fuse_errno(e) == code
    for name, code in [
        (b"trusted.x", errno.EOPNOTSUPP),  # only user.* is kept
        (b"user.", errno.EINVAL),
        (b"user.p2pfs.id", errno.EPERM),  # the synthetic attributes are not the user's
    ]:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setxattr(new.st_ino, pyfuse3.XAttrNameT(name), b"1", CTX)
        assert fuse_errno(e) == code, name
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setxattr(new.st_ino, pyfuse3.XAttrNameT(b"user.big"), b"v" * 65537, CTX)
    assert fuse_errno(e) == errno.E2BIG
    for i in range(2):
        await ops.setxattr(new.st_ino, pyfuse3.XAttrNameT(b"user.%d" % i), b"v" * 65000, CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setxattr(new.st_ino, pyfuse3.XAttrNameT(b"user.2"), b"v" * 65000, CTX)
    assert fuse_errno(e) == errno.ENOSPC  # all of one entry's attributes are bounded
    assert await ops.access(new.st_ino, os.W_OK, CTX)


async def test_a_bug_in_a_handler_is_eio_and_counted(world: World) -> None:
    world.publish("tools", {"a": b"x"})
    a = await world.lookup("tools/a")
    world.fs.faults.add("getattr")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await world.ops.getattr(a.st_ino, CTX)
    assert fuse_errno(e) == errno.EIO and world.fs.errors == 1
    world.fs.faults.clear()
    assert (await world.ops.getattr(a.st_ino, CTX)).st_ino == a.st_ino


async def test_failsafe_after_an_integrity_fault_refuses_writes(world: World) -> None:
    """S3QL's failsafe: once the publisher's own store fails verification for data a
    writable volume needs, writes and commits are refused (EROFS) instead of publishing
    a snapshot that references what is lost; reads of what is intact go on."""
    world.publish("tools", {"big": os.urandom(300_000), "ok": b"intact"})
    live = await world.writable()
    ops = world.ops
    big = await world.lookup("tools/big")
    ok = await world.lookup("tools/ok")
    layout = await world.content.layout(
        bytes.fromhex(
            (await ops.getxattr(big.st_ino, pyfuse3.XAttrNameT(b"user.p2pfs.id"), CTX)).decode()
        )
    )
    path = world.store.path_of(layout.ids[0])
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    info = await ops.open(big.st_ino, os.O_RDONLY, CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(info.fh, 0, 4096)
    assert fuse_errno(e) == errno.EIO  # never a wrong byte
    await ops.release(info.fh)
    stats = live.statistics("tools")
    assert stats is not None and stats.failsafe
    assert "failsafe" in str(stats.error)
    tools = await world.lookup("tools")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.create(tools.st_ino, pyfuse3.FileNameT(b"n"), 0o644, os.O_WRONLY, CTX)
    assert fuse_errno(e) == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ok.st_ino, os.O_WRONLY, CTX)
    assert fuse_errno(e) == errno.EROFS
    with pytest.raises(P2pfsError, match="failsafe"):
        await live.commit("tools")
    rd = await ops.open(ok.st_ino, os.O_RDONLY, CTX)
    assert bytes(await ops.read(rd.fh, 0, 100)) == b"intact"
    await ops.release(rd.fh)
