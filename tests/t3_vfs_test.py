"""The filesystem layer without a mount: inodes, lookup counts, readdir offsets, errno."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pfs.fs.api import FsError
from p2pfs.fs.vfs import ROOT_INO, FileSystem, Head
from p2pfs.home import Home
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.importer import Importer
from p2pfs.volume.registry import VolumeRegistry

pytestmark = pytest.mark.unit


class World:
    def __init__(self, root: Path) -> None:
        self.home = Home(root / "home")
        self.home.init()
        self.src = root / "src"
        self.src.mkdir()
        self.store = Store(self.home.store_dir)
        self.registry = VolumeRegistry(self.home)
        self.registry.create("vol")
        self.heads: dict[str, Head] = {}
        self.content = Content(self.store, chunk_cache_bytes=4 * 1024 * 1024)
        self.fs = FileSystem(self.content, lambda: self.heads)

    def publish(self) -> None:
        Importer(self.store, self.registry, "vol").run(self.src)
        record = self.registry.get("vol")
        snap = self.registry.load_head(self.store, record)
        assert snap is not None and record.head is not None
        self.heads["vol"] = Head(record.head, snap)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


async def test_lookup_counts_and_forget_free_inodes(world: World) -> None:
    (world.src / "a").write_bytes(b"abc")
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    assert stat.S_ISDIR(vol.mode)
    a1 = await fs.lookup(vol.ino, b"a")
    a2 = await fs.lookup(vol.ino, b"a")
    assert a1.ino == a2.ino and a1.size == 3
    before = fs.inode_count
    fs.forget(a1.ino, 1)
    assert (await fs.getattr(a1.ino)).ino == a1.ino  # one lookup left
    fs.forget(a1.ino, 1)
    assert fs.inode_count == before - 1
    with pytest.raises(FsError) as e:
        await fs.getattr(a1.ino)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FsError) as e:
        await fs.lookup(vol.ino, b"missing")
    assert e.value.errno == errno.ENOENT
    assert (await fs.lookup(vol.ino, b".")).ino == vol.ino
    assert (await fs.lookup(vol.ino, b"..")).ino == ROOT_INO


async def test_open_file_survives_forget_until_release(world: World) -> None:
    (world.src / "a").write_bytes(b"x" * 1000)
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    a = await fs.lookup(vol.ino, b"a")
    fh = (await fs.open(a.ino, os.O_RDONLY)).fh
    fs.forget(a.ino, 1)
    assert bytes(await fs.read(fh, 10, 5)) == b"xxxxx"
    fs.release(fh)
    with pytest.raises(FsError):
        await fs.getattr(a.ino)


async def test_writes_are_refused_read_only(world: World) -> None:
    (world.src / "a").write_bytes(b"x")
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    a = await fs.lookup(vol.ino, b"a")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(FsError) as e:
            await fs.open(a.ino, flags)
        assert e.value.errno == errno.EROFS
    with pytest.raises(FsError) as e:
        await fs.open(vol.ino, os.O_RDONLY)
    assert e.value.errno == errno.EISDIR


async def test_readdir_offsets_resume_without_skips_or_repeats(world: World) -> None:
    names = sorted(f"n{i:05d}".encode() for i in range(2500))
    for n in names:
        (world.src / n.decode()).touch()
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    fh = await fs.opendir(vol.ino)
    seen: list[bytes] = []
    offset = 0
    while True:
        batch = []
        for name, _attr, nxt in fs.readdir(fh, offset):
            batch.append(name)
            offset = nxt
            if len(batch) == 37:  # the kernel's buffer is full: stop mid-listing
                break
        if not batch:
            break
        seen += batch
    fs.releasedir(fh)
    assert seen == names


async def test_read_across_chunks_and_past_eof(world: World) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    (world.src / "big").write_bytes(data)
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    big = await fs.lookup(vol.ino, b"big")
    fh = (await fs.open(big.ino, os.O_RDONLY)).fh
    async with trio.open_nursery() as nursery:
        fs.attach(nursery)
        for off, size in [(0, 4096), (100_000, 2_000_000), (len(data) - 10, 4096), (len(data), 10)]:
            assert bytes(await fs.read(fh, off, size)) == data[off : off + size]
        out = bytearray()
        pos = 0
        while pos < len(data):  # sequential: read-ahead kicks in
            piece = await fs.read(fh, pos, 128 * 1024)
            out += piece
            pos += len(piece)
        assert bytes(out) == data
        nursery.cancel_scope.cancel()
    fs.release(fh)


async def test_new_head_gives_a_new_root_inode(world: World) -> None:
    (world.src / "a").write_bytes(b"one")
    world.publish()
    fs = world.fs
    vol1 = await fs.lookup(ROOT_INO, b"vol")
    a1 = await fs.lookup(vol1.ino, b"a")
    fh = (await fs.open(a1.ino, os.O_RDONLY)).fh
    (world.src / "a").write_bytes(b"two!")
    world.publish()
    vol2 = await fs.lookup(ROOT_INO, b"vol")
    assert vol2.ino != vol1.ino
    a2 = await fs.lookup(vol2.ino, b"a")
    assert a2.size == 4
    assert bytes(await fs.read(fh, 0, 100)) == b"one"


async def test_xattrs_name_the_objects(world: World) -> None:
    (world.src / "a").write_bytes(b"one")
    os.symlink("a", world.src / "l")
    world.publish()
    fs = world.fs
    vol = await fs.lookup(ROOT_INO, b"vol")
    a = await fs.lookup(vol.ino, b"a")
    assert len(bytes.fromhex((await fs.getxattr(a.ino, b"user.p2pfs.id")).decode())) == 32
    link = await fs.lookup(vol.ino, b"l")
    assert await fs.readlink(link.ino) == b"a"
    with pytest.raises(FsError) as e:
        await fs.getxattr(link.ino, b"user.p2pfs.id")
    assert e.value.errno == errno.ENODATA
