"""A wheel built from the checkout installs in a fresh virtualenv and works there.

Nothing of the checkout is on that venv's path: what the program reads at run time
(the appliance's build files, the smb.conf template) must ship inside the package.
The venv's p2pfs then inits a node, creates a volume, imports, mounts, reads back
and unmounts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.fuse, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ]
    )
    (wheel,) = wheels.glob("p2pfs-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    exe = str(venv / "bin" / "p2pfs")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "P2PFS_HOME")}
    cwd = tmp_path  # not the checkout: nothing of it may be imported
    where = run(
        [str(venv / "bin" / "python"), "-c", "import p2pfs; print(p2pfs.__file__)"],
        cwd=cwd,
        env=env,
    )
    assert where.stdout.startswith(str(venv)), where.stdout

    version = run([exe, "--version"], cwd=cwd, env=env).stdout
    assert version.startswith("p2pfs ") and version.split()[1][0].isdigit()
    assert "--wheels" in run([exe, "appliance", "build", "--help"], cwd=cwd, env=env).stdout
    smb = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from pathlib import Path; from p2pfs.appliance.samba import render_smb_conf, "
            "smb_template; print(render_smb_conf(smb_template(), interface='192.168.56.2/24', "
            "mount=Path('/srv/p2pfs'), users=['desk'], state=Path('/var/lib/p2pfs/samba')))",
        ],
        cwd=cwd,
        env=env,
    ).stdout
    assert "192.168.56.2/24" in smb and "read only = yes" in smb.lower()

    home, src, mnt = tmp_path / "home", tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    payload = os.urandom(700_000)
    (src / "sub").mkdir()
    (src / "sub" / "blob").write_bytes(payload)
    h = [exe, "--home", str(home)]
    run([*h, "init"], cwd=cwd, env=env)
    run([*h, "volume", "create", "tools"], cwd=cwd, env=env)
    run([*h, "import", str(src), "tools"], cwd=cwd, env=env)
    run([*h, "mount", "--read-only", str(mnt)], cwd=cwd, env=env)
    try:
        assert (mnt / "tools" / "sub" / "blob").read_bytes() == payload
    finally:
        umount = subprocess.run(
            [*h, "umount", str(mnt)], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
        )
        if umount.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert umount.returncode == 0, umount.stderr
    assert not os.path.ismount(mnt)
