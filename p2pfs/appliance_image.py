"""``p2pfs appliance build|seed|firstboot``: the appliance VM image and its seed disk.

``build`` drives ``contrib/appliance/build-image.sh`` (so it runs from a checkout of
the repository, as root): a Debian 12 root by debootstrap (stage ``base``), then p2pfs
from wheels built here, the systemd units and a bootable raw disk (stage ``image``).
Each stage is cached under a hash of its inputs (``P2PFS_APPLIANCE_CACHE``, default
``/var/cache/p2pfs-appliance``): a second build with the same inputs only converts.
``--format`` converts with ``qemu-img`` for the usual hypervisors.
See docs/appliance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .appliance_seed import firstboot, make_seed_tree, pack_seed
from .errors import P2pfsError, UsageError
from .home import Home, default_home

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "appliance"
BUILD_SCRIPT = CONTRIB / "build-image.sh"
BASE_SCRIPT = CONTRIB / "debootstrap.sh"
DEFAULT_CACHE = Path("/var/cache/p2pfs-appliance")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SIZE = "8G"
FORMATS = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vhdx": "vhdx"}
BUILD_TOOLS = {
    "debootstrap": "debootstrap",
    "qemu-img": "qemu-utils",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "mkfs.ext4": "e2fsprogs",
    "sfdisk": "fdisk",
    "unshare": "util-linux",
}
MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")


@dataclass(frozen=True)
class BuiltImage:
    """A cached image: the raw disk, and its kernel and initrd for direct kernel boot."""

    disk: Path
    kernel: Path
    initrd: Path
    key: str

    # The kernel command line of the image's own boot loader (syslinux.cfg).
    CMDLINE = "root=LABEL=p2pfs-root ro net.ifnames=0 console=ttyS0,115200"


def build_unavailable() -> str | None:
    """Why this machine cannot build the image (None if it can)."""
    if os.geteuid() != 0:
        return "building the appliance image needs root (debootstrap, chroot)"
    missing = [f"{t} ({p})" for t, p in BUILD_TOOLS.items() if shutil.which(t) is None]
    if not MBR.exists():
        missing.append(f"{MBR} (syslinux-common)")
    if missing:
        return "missing: " + ", ".join(missing)
    if not BUILD_SCRIPT.exists():
        return f"{BUILD_SCRIPT} is missing: build from a checkout of the repository"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("P2PFS_APPLIANCE_CACHE") or DEFAULT_CACHE)


def _hash_files(h: hashlib._Hash, paths: list[Path]) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())


def base_key(mirror: str) -> str:
    h = hashlib.sha256(b"p2pfs-appliance-base-v1\0" + mirror.encode() + b"\0")
    _hash_files(h, [BASE_SCRIPT])
    return h.hexdigest()[:16]


def image_key(mirror: str, size: str) -> str:
    """Everything the image is made of: the base, contrib/appliance/, the package's sources."""
    h = hashlib.sha256(b"p2pfs-appliance-image-v1\0" + size.encode() + b"\0")
    h.update(base_key(mirror).encode())
    files = [p for p in CONTRIB.rglob("*") if p.is_file()]
    files += [p for p in (ROOT / "p2pfs").glob("*") if p.is_file() and p.suffix in (".py", ".pyi")]
    files += [ROOT / "pyproject.toml", *(ROOT / "native").glob("*.pyx")]
    _hash_files(h, files)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(argv: list[str], what: str, log: Path) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise P2pfsError(f"{what} failed ({proc.returncode}); log {log}:\n{tail}")


def build_wheels(dest: Path, log: Path) -> None:
    """p2pfs and its dependencies as wheels (this machine: Debian 12, Python 3.11, like the image)."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "-w", str(dest)]
    _run([*argv, str(ROOT)], "building the wheels", log)


def build_cached(mirror: str = DEFAULT_MIRROR, size: str = DEFAULT_SIZE) -> BuiltImage:
    """The raw image for these inputs, built unless the cache already holds it."""
    if reason := build_unavailable():
        raise P2pfsError(f"cannot build the appliance image: {reason}")
    cache = cache_dir()
    bkey, ikey = base_key(mirror), image_key(mirror, size)
    with _locked(cache):
        image_dir = cache / f"image-{ikey}"
        built = BuiltImage(
            image_dir / "p2pfs-appliance.raw",
            image_dir / "p2pfs-appliance.raw.vmlinuz",
            image_dir / "p2pfs-appliance.raw.initrd",
            ikey,
        )
        if (image_dir / "done").exists():
            return built
        log = cache / f"build-{ikey}.log"
        base = cache / f"base-{bkey}"
        if not (base / "done").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            _run([str(BUILD_SCRIPT), "base", str(base / "root"), mirror], "debootstrap", log)
            (base / "done").touch()
        shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="p2pfs-wheels-", dir=cache) as wheels:
            build_wheels(Path(wheels), log)
            _run(
                [str(BUILD_SCRIPT), "image", str(base / "root"), wheels, str(built.disk), size],
                "building the image",
                log,
            )
        (image_dir / "done").touch()
        _prune(cache, {f"base-{bkey}", f"image-{ikey}"})
        return built


def _prune(cache: Path, keep: set[str]) -> None:
    """Older images (other inputs) go; one base and one image stay."""
    for p in cache.iterdir():
        if p.is_dir() and p.name.startswith(("base-", "image-")) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def convert(src: Path, out: Path, fmt: str) -> None:
    """``qemu-img convert`` the raw disk to a hypervisor's format."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    argv = ["qemu-img", "convert", "-f", "raw", "-O", FORMATS[fmt]]
    if fmt == "vhdx":
        argv += ["-o", "subformat=dynamic"]
    if fmt == "vmdk":
        argv += ["-o", "subformat=streamOptimized,adapter_type=lsilogic"]
    tmp = out.with_name(f".{out.name}.tmp")
    proc = subprocess.run([*argv, str(src), str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise P2pfsError(f"qemu-img convert to {fmt} failed: {proc.stderr.strip()}")
    tmp.replace(out)


def _format_of(out: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = out.suffix.lstrip(".")
    return {"img": "raw"}.get(suffix, suffix if suffix in FORMATS else "qcow2")


# -- the command line ---------------------------------------------------------------


def add_actions(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = asub.add_parser("build", help="(admin, root) build the appliance VM image")
    b.add_argument("--out", required=True, type=Path, metavar="FILE")
    b.add_argument("--format", choices=sorted(FORMATS), help="default: from --out's suffix")
    b.add_argument("--size", default=DEFAULT_SIZE, help="the disk's virtual size (default 8G)")
    b.add_argument("--mirror", default=DEFAULT_MIRROR, help="the Debian mirror for debootstrap")
    b.add_argument("--kernel", action="store_true", help="also write FILE.vmlinuz, FILE.initrd")

    s = asub.add_parser("seed", help="(admin) make an appliance's seed disk (a secret)")
    s.add_argument("--bundle", required=True, type=Path, help="the appliance node's join bundle")
    s.add_argument("--volumes", default="", help="volumes to follow, comma separated (all)")
    s.add_argument("--cache", help="the store's quota, like 20G (default: none)")
    s.add_argument("--listen", required=True, metavar="ADDR[/PREFIX][:PORT]")
    s.add_argument("--desktop", action="append", default=[], metavar="NAME", required=True)
    s.add_argument("--lan", default="dhcp", help="the LAN NIC: dhcp or ADDR/PREFIX")
    s.add_argument("--gateway", help="the LAN's default gateway (with a static --lan)")
    s.add_argument("--peer", action="append", default=[], metavar="HOST:PORT")
    s.add_argument("--no-discovery", action="store_true", help="no mDNS on the LAN")
    s.add_argument("--desktop-pin", action="store_true", help="desktops may pin and unpin")
    s.add_argument("--out", required=True, type=Path, metavar="FILE")
    s.add_argument("--format", choices=sorted(FORMATS), default="raw")

    f = asub.add_parser("firstboot", help="(inside the appliance) apply the seed disk")
    f.add_argument("--label", default="P2PFS-SEED")
    f.add_argument("--wait", type=float, default=20.0, metavar="SECONDS")


ACTIONS = ("build", "seed", "firstboot")


def cmd_action(args: argparse.Namespace) -> int:
    if args.appliance_command == "build":
        return _cmd_build(args)
    if args.appliance_command == "seed":
        return _cmd_seed(args)
    home = Home((args.home or default_home()).absolute())
    return firstboot(home, label=args.label, wait_s=args.wait)


def _cmd_build(args: argparse.Namespace) -> int:
    fmt = _format_of(args.out, args.format)
    built = build_cached(args.mirror, args.size)
    convert(built.disk, args.out, fmt)
    if args.kernel:
        shutil.copyfile(built.kernel, f"{args.out}.vmlinuz")
        shutil.copyfile(built.initrd, f"{args.out}.initrd")
    print(f"wrote {args.out} ({fmt}, image {built.key}; cache {cache_dir()})")
    return 0


def _cmd_seed(args: argparse.Namespace) -> int:
    staging = Home((args.home or default_home()).absolute()).require()
    try:
        bundle = args.bundle.read_bytes()
    except OSError as e:
        raise UsageError(f"--bundle {args.bundle}: {e.strerror}") from None
    volumes = [v for v in args.volumes.split(",") if v]
    out = args.out.absolute()
    with tempfile.TemporaryDirectory(prefix="p2pfs-seed-") as tmp:
        tokens = make_seed_tree(
            staging,
            bundle,
            Path(tmp) / "seed",
            volumes=volumes,
            cache=args.cache,
            listen=args.listen,
            desktops=args.desktop,
            lan=args.lan,
            gateway=args.gateway,
            peers=args.peer,
            discovery=not args.no_discovery,
            desktop_pin=args.desktop_pin,
            token_dir=out.parent,
        )
        if args.format == "raw":
            pack_seed(Path(tmp) / "seed", out)
        else:
            raw = Path(tmp) / "seed.img"
            pack_seed(Path(tmp) / "seed", raw)
            convert(raw, out, args.format)
            out.chmod(0o600)
    print(f"wrote the seed {out} (a secret: it holds the node key; delete it after first boot)")
    for name, path in tokens.items():
        print(f"desktop {name}: token {path}, SMB account {path.with_suffix('.smb')}")
    return 0
