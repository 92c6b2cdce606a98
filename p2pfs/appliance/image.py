"""The appliance VM image (``p2pfs appliance build``), built once per set of inputs.

``build`` drives ``files/build-image.sh`` (shipped inside the package with the units,
smb.conf, nftables.conf and networkd files, read through ``importlib.resources``), as
root: a Debian 12 root by debootstrap (stage ``base``), then p2pfs from wheels (built
here from a checkout, or given with ``--wheels DIR`` where p2pfs was installed from a
wheel), the systemd units and a bootable raw disk (stage ``image``).
Each stage is cached under a hash of its inputs (``P2PFS_APPLIANCE_CACHE``, default
``/var/cache/p2pfs-appliance``): a second build with the same inputs only converts.
``--format`` converts with ``qemu-img`` for the usual hypervisors.
See docs/appliance.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from p2pfs.errors import P2pfsError, UsageError
from p2pfs.fsutil import locked

PACKAGE = Path(__file__).resolve().parents[1]  # p2pfs/, installed or in a checkout
CHECKOUT = PACKAGE.parent  # a checkout of the repository, if pyproject.toml is there
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
NO_CHECKOUT = (
    "p2pfs is installed, not a checkout: give its wheels with --wheels DIR "
    "('pip wheel p2pfs -w DIR' on a machine like the image: Debian 12, Python 3.11)"
)


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
    return None


def files_dir() -> Path:
    """The files the image is built from, shipped inside the package."""
    ref = importlib.resources.files("p2pfs.appliance") / "files"
    if not isinstance(ref, Path) or not ref.is_dir():
        raise P2pfsError(f"the appliance build files are missing from the package ({ref})")
    return ref


def in_checkout() -> bool:
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "native").is_dir()


def cache_dir() -> Path:
    return Path(os.environ.get("P2PFS_APPLIANCE_CACHE") or DEFAULT_CACHE)


def _hash_files(h: hashlib._Hash, base: Path, paths: list[Path]) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(base)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())


def base_key(mirror: str) -> str:
    h = hashlib.sha256(b"p2pfs-appliance-base-v1\0" + mirror.encode() + b"\0")
    _hash_files(h, files_dir(), [files_dir() / "debootstrap.sh"])
    return h.hexdigest()[:16]


def image_key(mirror: str, size: str, wheels: Path | None = None) -> str:
    """Everything the image is made of: the base, the build files, p2pfs itself (the
    package's sources, and the checkout's build inputs, or the wheels given)."""
    h = hashlib.sha256(b"p2pfs-appliance-image-v2\0" + size.encode() + b"\0")
    h.update(base_key(mirror).encode())
    sources = [
        p
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc", ".c")
    ]
    _hash_files(h, PACKAGE, sources)
    if wheels is not None:
        _hash_files(h, wheels, [p for p in wheels.glob("*.whl")])
    elif in_checkout():
        _hash_files(
            h, CHECKOUT, [CHECKOUT / "pyproject.toml", *(CHECKOUT / "native").glob("*.pyx")]
        )
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    with locked(path / ".lock"):
        yield


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
    if not in_checkout():
        raise UsageError(NO_CHECKOUT)
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "-w", str(dest)]
    _run([*argv, str(CHECKOUT)], "building the wheels", log)


def _script(*args: str) -> list[str]:
    # bash, not the file's own mode: a wheel need not keep the executable bit.
    return ["bash", str(files_dir() / "build-image.sh"), *args]


def build_cached(
    mirror: str = DEFAULT_MIRROR, size: str = DEFAULT_SIZE, wheels: Path | None = None
) -> BuiltImage:
    """The raw image for these inputs, built unless the cache already holds it."""
    if reason := build_unavailable():
        raise P2pfsError(f"cannot build the appliance image: {reason}")
    if wheels is not None and not any(wheels.glob("p2pfs-*.whl")):
        raise UsageError(f"--wheels {wheels}: no p2pfs-*.whl in it")
    if wheels is None and not in_checkout():
        raise UsageError(NO_CHECKOUT)
    cache = cache_dir()
    bkey, ikey = base_key(mirror), image_key(mirror, size, wheels)
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
            _run(_script("base", str(base / "root"), mirror), "debootstrap", log)
            (base / "done").touch()
        shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="p2pfs-wheels-", dir=cache) as tmp:
            if wheels is None:
                build_wheels(Path(tmp), log)
            else:
                for w in wheels.glob("*.whl"):
                    shutil.copy(w, tmp)
            _run(
                _script("image", str(base / "root"), tmp, str(built.disk), size),
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


def format_of(out: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = out.suffix.lstrip(".")
    return {"img": "raw"}.get(suffix, suffix if suffix in FORMATS else "qcow2")
