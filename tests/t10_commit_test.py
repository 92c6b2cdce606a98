"""Commits from the publisher's mount: what they make, what they refuse, how they fail.

Through the real mount and CLI: a tree written with ``cp -a`` commits to the very
tree object ``p2pfs import`` makes of the same tree; an import into a mounted
volume shows when nothing is pending; bad requests get clear errors; a full store
fails the commit loudly and loses nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from harness import mounted, run_cli

pytestmark = [pytest.mark.mount, pytest.mark.fuse]
MIB = 1024 * 1024


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 * MIB + 17))
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("sub/b.bin")
    os.utime(root / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def _commit(home: Path, volume: str = "tools") -> dict[str, object]:
    out = run_cli(home, "commit", volume, "--json", check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_a_tree_written_with_cp_a_commits_to_the_tree_import_makes(
    home: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _tree(src / "tree")
    (home / "config.toml").write_text("[publish]\nsettle_s = 0\n")
    run_cli(home, "volume", "create", "written", check=True)
    run_cli(home, "volume", "create", "imported", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        subprocess.run(["cp", "-a", str(src / "tree"), str(mp / "written")], check=True)
        first = _commit(home, "written")
        assert first["changed"] and first["seq"] == 1
        again = _commit(home, "written")
        assert not again["changed"] and again["seq"] == 1  # nothing changed since
        run_cli(home, "import", str(src), "imported", check=True)
        ours = os.getxattr(mp / "written" / ".snapshots" / "1" / "tree", "user.p2pfs.id")
        theirs = os.getxattr(mp / "imported" / "tree", "user.p2pfs.id")
        assert ours == theirs  # same names, kinds, modes, mtimes, sizes, content
        # An import into a mounted writable volume with nothing pending shows at once.
        (src / "tree" / "a.txt").write_text("alpha, imported\n")
        run_cli(home, "import", str(src / "tree"), "written", check=True)
        assert (mp / "written" / "a.txt").read_text() == "alpha, imported\n"
        assert not (mp / "written" / "tree").exists()


def test_commit_requests_that_cannot_be_done_say_why(home: Path, tmp_path: Path) -> None:
    run_cli(home, "volume", "create", "tools", check=True)
    r = run_cli(home, "commit", "tools")
    assert r.returncode == 6 and "no p2pfs daemon is running" in r.stderr
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        r = run_cli(home, "commit", "tools")
        assert r.returncode == 1 and "read-only" in r.stderr
        assert os.listdir(mp) == []  # nothing committed yet: no snapshot to show
        with pytest.raises(OSError) as e:
            (mp / "x").write_text("no")
        assert e.value.errno == errno.EROFS
    with mounted(home, tmp_path / "mnt") as mp:
        r = run_cli(home, "commit", "nope")
        assert r.returncode == 3 and "nope" in r.stderr
        vol = mp / "tools"
        with pytest.raises(FileExistsError):
            (vol / ".snapshots").mkdir()  # the hidden history's name is taken
        os.mkfifo(vol / "fifo")
        assert stat.S_ISFIFO(os.lstat(vol / "fifo").st_mode)
        (vol / "f").write_text("x")
        os.setxattr(vol / "f", "user.note", b"v")
        assert os.getxattr(vol / "f", "user.note") == b"v"
        with pytest.raises(OSError) as e:
            os.setxattr(vol / "f", "trusted.note", b"v")  # only user.* is kept
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            os.link(vol / "f", mp / "tools" / ".snapshots")
        assert e.value.errno == errno.EEXIST


def test_a_full_store_fails_the_commit_and_loses_nothing(home: Path, tmp_path: Path) -> None:
    (home / "config.toml").write_text('[publish]\nsettle_s = 0\n[cache]\nmax_bytes = "24M"\n')
    run_cli(home, "volume", "create", "tools", check=True)
    blobs = {f"f{i}.bin": os.urandom(10 * MIB) for i in range(4)}
    with mounted(home, tmp_path / "mnt") as mp:
        for name, data in blobs.items():
            (mp / "tools" / name).write_bytes(data)
        r = run_cli(home, "commit", "tools")
        assert r.returncode != 0 and "quota" in r.stderr.lower(), r.stderr
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        live = status["volumes"][0]["live"]
        assert live["uncommitted"] and live["staged_files"] >= 1
        for name, data in blobs.items():  # still all there, from staging or the store
            assert (mp / "tools" / name).read_bytes() == data
        # Room again: the same commit goes through with every byte.
        (home / "config.toml").write_text("[publish]\nsettle_s = 0\n")
    with mounted(home, tmp_path / "mnt") as mp:
        assert _commit(home)["changed"]
        for name, data in blobs.items():
            assert (mp / "tools" / ".snapshots" / "1" / name).read_bytes() == data
    shutil.rmtree(tmp_path / "mnt", ignore_errors=True)
