"""Appliance mode as a real VM: the image, its seed disk, first boot, and what the desktop sees.

The seed reader's errors are unit-tested here (no VM). The VM test builds the image
(``p2pfs appliance build``'s cache: a second local run reuses it), boots it under QEMU
(TCG, 2 vCPUs, 1 GiB) in a lab (docs/lab.md): its LAN NIC on the lab switch with an
admin/publisher node, its host-only NIC a tap in the desktop's namespace. The appliance
joins the estate from its seed; the desktop reads through the thin client and SMB; a
port scan of the host-only address finds only the desktop link and SMB. A second, short
boot with a bad seed reports it on the serial console.

It runs in ``make test`` and CI. Locally, ``P2PFS_SKIP_VM=1`` skips it; in CI (``CI``
set) any skip of it fails the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import require_lab, run_cli

from p2pfs import config
from p2pfs.appliance.seed import (
    SEED_STATUS,
    SeedError,
    apply_seed,
    make_seed_tree,
    network_files,
    node_config,
    pack_seed,
    read_seed,
    write_status,
)
from p2pfs.home import Home

HOST_ONLY_APPLIANCE = "192.168.56.2"
HOST_ONLY_DESKTOP = "192.168.56.1/24"


# -- the seed, without a VM -------------------------------------------------------------


def _enrol(tmp: Path) -> tuple[Path, Path, Path]:
    """An admin home with an estate, a staging home for the appliance, its bundle."""
    admin, staging = tmp / "admin", tmp / "appl"
    run_cli(admin, "init", check=True)
    run_cli(admin, "estate", "init", check=True)
    run_cli(staging, "init", check=True)
    run_cli(staging, "request-join", "--out", str(tmp / "appl.req"), check=True)
    bundle = tmp / "appl.bundle"
    run_cli(admin, "estate", "approve", str(tmp / "appl.req"), "--out", str(bundle), check=True)
    return admin, staging, bundle


def _seed_tree(tmp: Path, staging: Path, bundle: Path, **kw: object) -> Path:
    tree = tmp / "seed"
    args: dict[str, object] = {
        "volumes": ["tools"],
        "cache": "1G",
        "listen": f"{HOST_ONLY_APPLIANCE}/24:7421",
        "desktops": ["desk"],
        "token_dir": tmp / "tokens",
    }
    args.update(kw)
    make_seed_tree(Home(staging), bundle.read_bytes(), tree, **args)  # type: ignore[arg-type]
    return tree


@pytest.mark.unit
def test_seed_reader_names_what_is_wrong(tmp_path: Path) -> None:
    _, staging, bundle = _enrol(tmp_path)
    tree = _seed_tree(tmp_path, staging, bundle)
    seed = read_seed(tree)
    assert seed.volumes == ("tools",) and seed.listen == f"{HOST_ONLY_APPLIANCE}:7421"
    assert set(seed.desktops) == {"desk"} and (tmp_path / "tokens" / "desk.token").exists()
    assert 'volumes = ["tools"]' in node_config(seed)
    assert f"Address={HOST_ONLY_APPLIANCE}/24" in network_files(seed)["20-hostonly.network"]

    def broken(change: str) -> str:
        bad = tmp_path / f"bad-{change}"
        shutil.copytree(tree, bad)
        if change == "no-bundle":
            (bad / "node.bundle").unlink()
        elif change == "no-config":
            (bad / "config.toml").unlink()
        elif change == "garbage-config":
            (bad / "config.toml").write_bytes(b"[seed\n\xff\xfe")
        elif change == "bad-address":
            text = (bad / "config.toml").read_text()
            (bad / "config.toml").write_text(text.replace("192.168.56.2/24", "192.168.56.300/24"))
        elif change == "garbage-bundle":
            (bad / "node.bundle").write_bytes(b"not a bundle")
        with pytest.raises(SeedError) as e:
            read_seed(bad)
        return str(e.value)

    assert "has no node.bundle" in broken("no-bundle")
    assert "has no config.toml" in broken("no-config")
    assert "config.toml is unreadable" in broken("garbage-config")
    assert "config.toml is unreadable" in broken("bad-address")
    assert "node.bundle is unusable" in broken("garbage-bundle")

    # Wrong estate: the bundle of another estate's admin.
    other = tmp_path / "other"
    other.mkdir()
    _, other_staging, other_bundle = _enrol(other)
    wrong = tmp_path / "wrong"
    shutil.copytree(tree, wrong)
    shutil.copyfile(other_bundle, wrong / "node.bundle")
    with pytest.raises(SeedError, match=r"wrong estate: the seed's node\.bundle is for estate"):
        read_seed(wrong)
    # A bundle of this estate for another node: refused when applied.
    mismatch = tmp_path / "mismatch"
    shutil.copytree(tree, mismatch)
    shutil.copyfile(other_staging / "node.key", mismatch / "node.key")
    with pytest.raises(SeedError, match=r"node\.key is not node"):
        apply_seed(Home(tmp_path / "h1"), mismatch, read_seed(mismatch), system_root=None)

    # A good seed makes a joined, configured home.
    home = Home(tmp_path / "appliance-home")
    apply_seed(home, tree, seed, system_root=None)
    assert home.node_id().hex() == seed.node
    assert (home.root / "appliance" / "link.pem").exists()
    cfg = config.load(home.config_file)
    assert cfg.follow_volumes == ("tools",) and cfg.cache_max_bytes == 1 << 30
    assert cfg.appliance_listen == (f"{HOST_ONLY_APPLIANCE}:7421",)


@pytest.mark.unit
def test_status_shows_a_bad_seed(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init()
    write_status(home, {"ok": False, "error": "the seed has no node.bundle (...)"})
    st = json.loads(run_cli(home.root, "status", "--json", check=True).stdout)
    assert st["seed"] == {"ok": False, "error": "the seed has no node.bundle (...)"}
    text = run_cli(home.root, "status", check=True).stdout
    assert "seed: ERROR: the seed has no node.bundle" in text
    (home.root / SEED_STATUS).unlink()
    assert "seed" not in json.loads(run_cli(home.root, "status", "--json", check=True).stdout)


@pytest.mark.unit
def test_seed_image_is_a_labelled_fat_disk(tmp_path: Path) -> None:
    if shutil.which("mkfs.vfat") is None or shutil.which("mdir") is None:
        if os.environ.get("CI"):
            pytest.fail("dosfstools and mtools must be installed in CI")
        pytest.skip("dosfstools/mtools missing")
    _, staging, bundle = _enrol(tmp_path)
    tree = _seed_tree(tmp_path, staging, bundle)
    img = tmp_path / "seed.img"
    pack_seed(tree, img)
    out = subprocess.run(
        ["mdir", "-i", str(img), "::/"],
        capture_output=True,
        text=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        check=True,
    ).stdout
    assert "P2PFS-SEED" in out and "config" in out.lower()


# -- the VM ------------------------------------------------------------------------------


def require_vm() -> None:
    """Skip when asked (P2PFS_SKIP_VM) or unable, locally; in CI every skip fails."""
    from p2pfs.appliance.image import build_unavailable
    from p2pfs.lab.vm import qemu_unavailable

    require_lab()
    reason = None
    if os.environ.get("P2PFS_SKIP_VM"):
        reason = "P2PFS_SKIP_VM is set"
    else:
        reason = build_unavailable() or qemu_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the appliance VM test must run in CI: {reason}")
        pytest.skip(f"appliance VM test: {reason}")


def _tree(root: Path) -> dict[str, str]:
    rng = random.Random(13)
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho p2pfs\n")
    (root / "data.bin").write_bytes(rng.randbytes(3_000_000))
    (root / "notes.txt").write_text("read through the appliance\n" * 100)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _open_ports(scan: str) -> set[int]:
    """Open TCP ports from nmap's grepable output."""
    ports: set[int] = set()
    for line in scan.splitlines():
        if "Ports:" in line:
            for entry in line.split("Ports:", 1)[1].split(","):
                fields = entry.strip().split("/")
                if len(fields) > 1 and fields[1] == "open":
                    ports.add(int(fields[0]))
    return ports


@pytest.mark.vm
@pytest.mark.fuse
@pytest.mark.timeout(1200)
def test_appliance_vm_joins_serves_the_desktop_and_hides_the_admin_api(tmp_path: Path) -> None:
    require_vm()
    if shutil.which("nmap") is None or shutil.which("smbclient") is None:
        if os.environ.get("CI"):
            pytest.fail("nmap and smbclient must be installed in CI")
        pytest.skip("nmap or smbclient missing")
    from p2pfs.appliance.image import build_cached
    from p2pfs.lab.estate import EstateLab, wait_for
    from p2pfs.lab.netns import Lab
    from p2pfs.lab.vm import ApplianceVM

    image = build_cached()
    work = tmp_path
    tools = _tree(work / "tools-src")
    (work / "other-src").mkdir()
    (work / "other-src" / "secret.txt").write_text("not for this appliance\n")
    vms: list[ApplianceVM] = []
    mnt = work / "desk-mnt"
    try:
        with Lab(names=["admin", "desk"]) as lab:
            admin_host, desk = lab.hosts
            estate = EstateLab(lab, work / "estate")
            admin = estate.add_node("admin", admin_host)
            estate.publish(work / "tools-src", "tools")
            estate.publish(work / "other-src", "other")
            admin.start()
            lan_address = f"10.213.{lab.subnet_index}.200"

            # The admin enrols the appliance and makes its seed (and a bad one).
            staging = work / "appl-home"
            run_cli(staging, "init", check=True)
            run_cli(staging, "request-join", "--out", str(work / "appl.req"), check=True)
            bundle = work / "appl.bundle"
            approve = ["estate", "approve", str(work / "appl.req"), "--out", str(bundle)]
            run_cli(admin.home, *approve, check=True)
            seeds = work / "seeds"
            seeds.mkdir()
            made = run_cli(
                staging,
                "appliance",
                "seed",
                "--bundle",
                str(bundle),
                "--volumes",
                "tools",
                "--cache",
                "2G",
                "--listen",
                f"{HOST_ONLY_APPLIANCE}/24:7421",
                "--desktop",
                "desk",
                "--lan",
                f"{lan_address}/24",
                "--peer",
                f"{admin.address}:7420",
                "--out",
                str(seeds / "seed.img"),
                check=True,
            )
            assert "a secret" in made.stdout
            bad_tree = _seed_tree(work, staging, bundle)
            (bad_tree / "node.bundle").unlink()
            pack_seed(bad_tree, seeds / "bad-seed.img")

            # A bad seed: reported on the console (and by 'p2pfs status'), no boot loop.
            bad = ApplianceVM(image, seeds / "bad-seed.img", work / "vm-bad", where=desk)
            vms.append(bad.start())
            bad.wait_console(r"SEED ERROR: the seed has no node\.bundle")
            bad.wait_console(r"p2pfs status: seed: \{\"ok\": false, \"error\": \"the seed has no")
            bad.wait_console(r"stay down until a good seed")
            bad.stop()

            # The good seed: the appliance joins the estate and serves its desktop.
            vm = ApplianceVM(
                image,
                seeds / "seed.img",
                work / "vm",
                where=desk,
                lan=(lab.switch_netns, "br0"),
                host_only=(desk.netns, HOST_ONLY_DESKTOP),
            )
            vms.append(vm.start())
            vm.wait_console(r"seed applied: node [0-9a-f]{32}")
            vm.wait_console(r"daemon up, volumes mounted on /srv/p2pfs")
            vm.wait_console(r"smbd up")
            token = seeds / "desk.token"

            def appliance_status() -> dict[str, object]:
                argv = [sys.executable, "-m", "p2pfs", "appliance", "status", "--json"]
                argv += ["--token", str(token)]
                proc = desk.run(argv, capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, proc.stderr
                st: dict[str, object] = json.loads(proc.stdout)
                return st

            def has_tools() -> bool:
                vols = appliance_status()["volumes"]
                return isinstance(vols, list) and any(v["name"] == "tools" for v in vols)

            wait_for("the appliance to follow volume tools", has_tools, timeout=300)
            st = appliance_status()
            assert (
                st["estate"]
                == json.loads(run_cli(admin.home, "status", "--json", check=True).stdout)["estate"]
            )

            # The thin client reads every file byte-identically; 'other' is not followed.
            mnt.mkdir()
            desk.track_mount(mnt)
            mount = [sys.executable, "-m", "p2pfs", "mount", "--token", str(token), str(mnt)]
            m = desk.run(mount, capture_output=True, text=True, timeout=120)
            assert m.returncode == 0, m.stderr
            assert sorted(os.listdir(mnt)) == ["tools"]
            for rel, digest in tools.items():
                assert hashlib.sha256((mnt / "tools" / rel).read_bytes()).hexdigest() == digest
            u = desk.run([sys.executable, "-m", "p2pfs", "umount", str(mnt)], timeout=60)
            assert u.returncode == 0

            # SMB: the desktop's account reads the same bytes; anonymous is refused.
            got = work / "smb-got"
            got.mkdir()
            share = f"//{HOST_ONLY_APPLIANCE}/p2pfs"
            for i, rel in enumerate(sorted(tools)):
                remote = "tools\\" + rel.replace("/", "\\")
                smb = desk.run(
                    [
                        "smbclient",
                        share,
                        "-A",
                        str(seeds / "desk.smb"),
                        "-c",
                        f'get "{remote}" {got}/{i}',
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert smb.returncode == 0, smb.stdout + smb.stderr
                assert hashlib.sha256((got / str(i)).read_bytes()).hexdigest() == tools[rel]
            anon = desk.run(
                ["smbclient", share, "-N", "-c", "ls"], capture_output=True, text=True, timeout=60
            )
            assert anon.returncode != 0 and "NT_STATUS_" in anon.stdout + anon.stderr

            # The host-only address answers on the desktop link and SMB only: no peer
            # port, no ssh, no control socket, nothing else (every TCP port scanned).
            scan = desk.run(
                [
                    "nmap",
                    "-n",
                    "-Pn",
                    "-sT",
                    "-p-",
                    "-T4",
                    "--max-retries",
                    "1",
                    "-oG",
                    "-",
                    HOST_ONLY_APPLIANCE,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert scan.returncode == 0, scan.stderr
            assert _open_ports(scan.stdout) == {445, 7421}, scan.stdout
            # ... while the same scanner finds the peer port on the LAN side.
            lan_scan = admin_host.run(
                ["nmap", "-n", "-Pn", "-sT", "-p", "22,139,445,7420,7421", "-oG", "-", lan_address],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert 7420 in _open_ports(lan_scan.stdout), lan_scan.stdout
            assert not {22, 139, 445, 7421} & _open_ports(lan_scan.stdout), lan_scan.stdout
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for v in vms:
            v.stop()
