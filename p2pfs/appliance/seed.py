"""The appliance's seed disk: made by the admin, read by the appliance's first boot.

A seed is a small FAT image labelled ``P2PFS-SEED`` (made without mounting anything:
``mkfs.vfat`` and ``mcopy``) holding::

    config.toml          [seed] format, estate, node, volumes, cache, desktop_pin,
                                desktop_snapshots
                         [host_only] address (CIDR), port   [lan] address, peers, discovery
                         [desktops.NAME] smb_password
    node.key             the appliance's node key (made on the admin machine: see below)
    node.bundle          its estate bundle ('p2pfs estate approve')
    appliance/           link certificate and key, handle key, the desktops' token digests

The node key is made on the admin machine, in a staging home that becomes the
appliance's home (``p2pfs --home STAGING init; request-join; estate approve; appliance
seed --home STAGING ...``), so one seed carries a complete enrolment: **the seed is a
secret** (like the node key it holds). Hand it to the hypervisor, boot once, then delete
it. See docs/appliance.md.

The appliance side (``p2pfs appliance firstboot``, run by ``p2pfs-firstboot.service``)
checks the seed, reports a bad one on the console and in ``p2pfs status`` (``seed``),
and configures the node home, the host-only address, the firewall port, Samba and its
accounts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from p2pfs.config import decode, parse_peer
from p2pfs.errors import P2pfsError, UsageError
from p2pfs.fsutil import write_atomic
from p2pfs.home import Home
from p2pfs.names import check_volume_name
from p2pfs.sizes import parse_size
from p2pfs.trust import enrolment
from p2pfs.trust.desktop import ApplianceKeys

from .samba import is_account, render_smb_conf, smb_state_dirs

SEED_LABEL = "P2PFS-SEED"
SEED_FORMAT = 1
SEED_STATUS = "seed.json"  # HOME/seed.json: what the last first boot made of the seed
SEED_APPLIED = "seed.applied"  # HOME/seed.applied: a seed was applied; the units start
DEFAULT_PORT = 7421
DEFAULT_PREFIX = 24
SEED_SIZE_KIB = 4096


class SeedError(P2pfsError):
    """The seed cannot be used: the text says what is wrong with it."""


@dataclass(frozen=True)
class Seed:
    """A checked seed's settings."""

    estate: str
    node: str
    volumes: tuple[str, ...]
    cache: str | None
    desktop_pin: bool
    host_only: str  # CIDR, e.g. 192.168.56.2/24
    port: int
    lan: str  # "dhcp" or a CIDR
    gateway: str | None
    peers: tuple[str, ...]
    discovery: bool
    desktops: dict[str, str]  # account -> SMB password
    desktop_snapshots: bool = True  # .snapshots/ on the link and on the SMB share

    @property
    def listen(self) -> str:
        return f"{self.host_only.split('/')[0]}:{self.port}"


# -- the admin side -------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR[/PREFIX][:PORT]`` -> (CIDR, port); defaults /24 and 7421."""
    addr, port = text, DEFAULT_PORT
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdecimal() and "." in head:
        addr, port = head, int(tail)
    if "/" not in addr:
        addr = f"{addr}/{DEFAULT_PREFIX}"
    try:
        iface = ipaddress.IPv4Interface(addr)
    except ValueError:
        raise UsageError(f"--listen {text!r} is not ADDR[/PREFIX][:PORT] (IPv4)") from None
    if not 0 < port < 65536 or port == 445:
        raise UsageError(f"--listen {text!r}: the port must be 1-65535 and not 445 (SMB)")
    return str(iface), port


def _check_cidr(text: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Interface(text))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IPv4 address/prefix") from None


def make_seed_tree(
    staging: Home,
    bundle: bytes,
    out_dir: Path,
    *,
    volumes: list[str],
    cache: str | None,
    listen: str,
    desktops: list[str],
    lan: str = "dhcp",
    gateway: str | None = None,
    peers: list[str] | None = None,
    discovery: bool = True,
    desktop_pin: bool = False,
    desktop_snapshots: bool = True,
    token_dir: Path,
) -> dict[str, Path]:
    """Write the seed's files into ``out_dir``; the desktops' token and SMB files into
    ``token_dir``. Returns desktop -> token file. The bundle must be the staging home's."""
    staging.require()
    member = enrolment.join(staging, bundle)  # checks the bundle against the staging key
    for v in volumes:
        check_volume_name(v)
    if cache is not None:
        parse_size(cache, "--cache")
    host_only, port = parse_listen(listen)
    if lan != "dhcp":
        lan = _check_cidr(lan, "--lan")
    if gateway is not None:
        ipaddress.IPv4Address(gateway)
    for p in peers or []:
        parse_peer(p, "--peer")
    if not desktops:
        raise UsageError("name at least one desktop (--desktop NAME)")
    for d in desktops:
        if not is_account(d):
            raise UsageError(f"desktop {d!r}: lower-case letters, digits, - and _ (at most 31)")
    keys = ApplianceKeys(staging).ensure()
    address = f"{host_only.split('/')[0]}:{port}"
    tokens: dict[str, Path] = {}
    passwords: dict[str, str] = {}
    token_dir.mkdir(parents=True, exist_ok=True)
    for d in desktops:
        token = keys.add(d, address)
        path = token_dir / f"{d}.token"
        write_atomic(path, token.encode(), 0o600)
        passwords[d] = secrets.token_urlsafe(18)
        smb = f"username = {d}\npassword = {passwords[d]}\n"
        write_atomic(token_dir / f"{d}.smb", smb.encode(), 0o600)
        tokens[d] = path
    doc: dict[str, Any] = {
        "seed": {
            "format": SEED_FORMAT,
            "estate": member.estate_id.hex(),
            "node": staging.node_id().hex(),
            "volumes": volumes,
            "desktop_pin": desktop_pin,
            "desktop_snapshots": desktop_snapshots,
        },
        "host_only": {"address": host_only, "port": port},
        "lan": {"address": lan, "peers": list(peers or []), "discovery": discovery},
        "desktops": {d: {"smb_password": passwords[d]} for d in desktops},
    }
    if cache is not None:
        doc["seed"]["cache"] = cache
    if gateway is not None:
        doc["lan"]["gateway"] = gateway
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(_toml(doc))
    shutil.copyfile(staging.node_key, out_dir / "node.key")
    (out_dir / "node.bundle").write_bytes(bundle)
    shutil.copytree(keys.root, out_dir / "appliance", dirs_exist_ok=True)
    return tokens


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _toml(doc: dict[str, Any]) -> str:
    """Just enough TOML for the seed: tables of scalars and lists, one level of subtables."""
    lines = ["# p2pfs appliance seed (docs/appliance.md). A secret: it holds the node key."]
    for table, body in doc.items():
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        if scalars or not subs:
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        for name, sub in subs.items():
            lines.append(f"\n[{table}.{json.dumps(name)}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def pack_seed(tree: Path, out: Path) -> None:
    """A FAT image labelled P2PFS-SEED holding ``tree`` (no mount, no root needed)."""
    for tool in ("mkfs.vfat", "mcopy"):
        if shutil.which(tool) is None:
            raise P2pfsError(f"{tool} is missing (Debian packages dosfstools, mtools)")
    out.unlink(missing_ok=True)
    subprocess.run(
        ["mkfs.vfat", "-n", SEED_LABEL, "-C", str(out), str(SEED_SIZE_KIB)],
        check=True,
        capture_output=True,
    )
    out.chmod(0o600)
    entries = [str(p) for p in sorted(tree.iterdir())]
    if entries:
        subprocess.run(
            ["mcopy", "-s", "-i", str(out), *entries, "::/"],
            check=True,
            capture_output=True,
            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        )


# -- the appliance side: reading ------------------------------------------------------


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SeedTable(_Table):
    format: int
    estate: str
    node: str
    volumes: list[str] = []
    cache: str | None = None
    desktop_pin: bool = False
    desktop_snapshots: bool = True  # absent in seeds made before it: the default


class HostOnlyTable(_Table):
    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = DEFAULT_PORT


class LanTable(_Table):
    address: str = "dhcp"
    gateway: str | None = None
    peers: list[str] = []
    discovery: bool = True


class DesktopTable(_Table):
    smb_password: Annotated[str, msgspec.Meta(min_length=1)]


class SeedFile(_Table):
    """The seed's config.toml as written (``make_seed_tree``)."""

    seed: SeedTable
    host_only: HostOnlyTable
    lan: LanTable = msgspec.field(default_factory=LanTable)
    desktops: dict[str, DesktopTable] = {}


def read_seed(root: Path) -> Seed:
    """Check a seed's files; a SeedError says what is wrong in one line."""
    cfg = root / "config.toml"
    if not cfg.is_file():
        raise SeedError("the seed disk has no config.toml: make it with 'p2pfs appliance seed'")
    try:
        data = cfg.read_bytes()
    except OSError as e:
        raise SeedError(f"the seed's config.toml is unreadable: {e.strerror}") from None
    try:
        doc = decode(data, "the seed's config.toml", SeedFile)
    except UsageError as e:
        raise SeedError(f"the seed's config.toml is unreadable: {e}") from None
    if doc.seed.format != SEED_FORMAT:
        raise SeedError(
            f"the seed's config.toml is unreadable: format {doc.seed.format!r}, "
            f"expected {SEED_FORMAT}"
        )
    try:
        values = _settings(doc)
    except (P2pfsError, ValueError) as e:
        raise SeedError(f"the seed's config.toml is unreadable: {e}") from None
    if not (root / "node.key").is_file():
        raise SeedError("the seed has no node.key: make it with 'p2pfs appliance seed'")
    bundle_path = root / "node.bundle"
    if not bundle_path.is_file():
        raise SeedError(
            "the seed has no node.bundle (the estate's approval of this appliance): "
            "'p2pfs estate approve' its request, then 'p2pfs appliance seed --bundle'"
        )
    try:
        bundle = enrolment.parse_bundle(bundle_path.read_bytes())
    except (OSError, P2pfsError) as e:
        raise SeedError(f"the seed's node.bundle is unusable: {e}") from None
    if bundle.estate_id.hex() != values.estate:
        raise SeedError(
            f"wrong estate: the seed's node.bundle is for estate {bundle.estate_id.hex()}, "
            f"but its config.toml names estate {values.estate}"
        )
    if not (root / "appliance" / "link.pem").is_file():
        raise SeedError("the seed has no appliance/link.pem: make it with 'p2pfs appliance seed'")
    return values


def _settings(doc: SeedFile) -> Seed:
    """What the types do not say: ids, names, addresses and sizes (ValueError)."""
    seed, host_only, lan = doc.seed, doc.host_only, doc.lan
    if not re.fullmatch(r"[0-9a-f]{32}", seed.estate):
        raise ValueError("[seed] estate must be 32 hex digits")
    if not re.fullmatch(r"[0-9a-f]{32}", seed.node):
        raise ValueError("[seed] node must be 32 hex digits")
    for v in seed.volumes:
        check_volume_name(v)
    if seed.cache is not None:
        parse_size(seed.cache, "[seed] cache")
    address = str(ipaddress.IPv4Interface(host_only.address))
    lan_address = lan.address
    if lan_address != "dhcp":
        lan_address = str(ipaddress.IPv4Interface(lan_address))
    gateway = None if lan.gateway is None else str(ipaddress.IPv4Address(lan.gateway))
    for p in lan.peers:
        parse_peer(p, "[lan] peers")
    accounts: dict[str, str] = {}
    for name, body in doc.desktops.items():
        if not is_account(name):
            raise ValueError(f"[desktops] {name!r} is not a desktop account")
        if "\n" in body.smb_password:
            raise ValueError(f"[desktops.{name}] smb_password is not one line")
        accounts[name] = body.smb_password
    if not accounts:
        raise ValueError("[desktops] names no desktop")
    return Seed(
        estate=seed.estate,
        node=seed.node,
        volumes=tuple(seed.volumes),
        cache=seed.cache,
        desktop_pin=seed.desktop_pin,
        host_only=address,
        port=host_only.port,
        lan=lan_address,
        gateway=gateway,
        peers=tuple(lan.peers),
        discovery=lan.discovery,
        desktops=accounts,
        desktop_snapshots=seed.desktop_snapshots,
    )


# -- the appliance side: applying ------------------------------------------------------


def node_config(seed: Seed) -> str:
    """The appliance node's HOME/config.toml."""
    lines = ["# written by the appliance's first boot from its seed (docs/appliance.md)"]
    lines += ["[network]", "port = 7420", f"discovery = {_toml_value(seed.discovery)}"]
    lines.append(f"static_peers = {_toml_value(list(seed.peers))}")
    if seed.cache is not None:
        lines += ["[cache]", f"max_bytes = {_toml_value(seed.cache)}"]
    lines += ["[appliance]", f"user_listen = {_toml_value([seed.listen])}"]
    lines.append(f"desktop_pin = {_toml_value(seed.desktop_pin)}")
    lines.append(f"desktop_snapshots = {_toml_value(seed.desktop_snapshots)}")
    lines.append(f"volumes = {_toml_value(list(seed.volumes))}")
    return "\n".join(lines) + "\n"


def network_files(seed: Seed) -> dict[str, str]:
    """systemd-networkd files: eth0 the LAN, eth1 the host-only link."""
    lan = ["[Match]", "Name=eth0", "", "[Network]"]
    if seed.lan == "dhcp":
        lan.append("DHCP=ipv4")
    else:
        lan.append(f"Address={seed.lan}")
        if seed.gateway:
            lan.append(f"Gateway={seed.gateway}")
    host = ["[Match]", "Name=eth1", "", "[Network]", f"Address={seed.host_only}"]
    host += ["LinkLocalAddressing=no", "IPv6AcceptRA=no", "", "[Link]", "RequiredForOnline=no"]
    return {
        "10-lan.network": "\n".join(lan) + "\n",
        "20-hostonly.network": "\n".join(host) + "\n",
    }


def apply_seed(home: Home, root: Path, seed: Seed, *, system_root: Path | None) -> None:
    """Make ``home`` the seeded node; with ``system_root``, configure that system too
    (``/`` on the appliance: network, firewall, Samba and its accounts)."""
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if home.is_initialized() and home.node_id().hex() != seed.node:
        # A home made on an earlier boot (e.g. by a bad seed): replace its identity.
        for p in (home.node_key, home.node_json):
            p.unlink()
        shutil.rmtree(home.estate_dir, ignore_errors=True)
    if not home.node_key.exists():
        shutil.copyfile(root / "node.key", home.node_key)
        home.node_key.chmod(0o600)
    home.init()
    if home.node_id().hex() != seed.node:
        raise SeedError(f"the seed's node.key is not node {seed.node} its config.toml names")
    try:
        enrolment.join(home, (root / "node.bundle").read_bytes())
    except P2pfsError as e:
        raise SeedError(f"the seed's node.bundle does not fit its node.key: {e}") from None
    write_atomic(home.config_file, node_config(seed).encode(), 0o600)
    shutil.copytree(root / "appliance", home.root / "appliance", dirs_exist_ok=True)
    for p in (home.root / "appliance").rglob("*"):
        p.chmod(0o700 if p.is_dir() else 0o600)
    (home.root / "appliance").chmod(0o700)
    if system_root is not None:
        _configure_system(system_root, seed)


def _configure_system(sysroot: Path, seed: Seed) -> None:

    netdir = sysroot / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    for name, text in network_files(seed).items():
        (netdir / name).write_text(text)
    template = (sysroot / "etc/p2pfs/nftables.conf").read_text()
    (sysroot / "etc/nftables.conf").write_text(template.replace("@LINK_PORT@", str(seed.port)))
    state = sysroot / "var/lib/p2pfs-samba"
    for d in smb_state_dirs(state):
        d.mkdir(parents=True, exist_ok=True)
    (state / "private").chmod(0o700)
    conf = sysroot / "etc/samba/smb.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        render_smb_conf(
            (sysroot / "etc/p2pfs/smb.conf").read_text(),
            interface=seed.host_only,
            mount=Path("/srv/p2pfs"),
            users=sorted(seed.desktops),
            state=Path("/var/lib/p2pfs-samba"),
        )
    )
    if sysroot != Path("/"):
        return
    for name, password in sorted(seed.desktops.items()):
        exists = subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0
        if not exists:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                check=True,
                capture_output=True,
            )
        subprocess.run(
            ["smbpasswd", "-c", str(conf), "-s", "-a", name],
            input=f"{password}\n{password}\n",
            text=True,
            check=True,
            capture_output=True,
        )


# -- the appliance side: first boot, status ----------------------------------------------


def write_status(home: Home, status: dict[str, Any]) -> None:
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(home.root / SEED_STATUS, json.dumps(status, indent=2).encode() + b"\n", 0o644)


def seed_status(home: Home) -> dict[str, Any] | None:
    """What the first boot made of the seed (for ``p2pfs status``), or None off an appliance."""
    try:
        doc = json.loads((home.root / SEED_STATUS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"ok": False, "error": f"{home.root / SEED_STATUS} is unreadable: {e}"}
    return doc if isinstance(doc, dict) else None


def console(text: str) -> None:
    """A line on the appliance's console(s): the serial console and the first screen."""
    for dev in ("/dev/console", "/dev/tty1"):
        with contextlib.suppress(OSError), open(dev, "w") as f:
            f.write(f"\r\n{text}\r\n")


def find_seed_device(label: str = SEED_LABEL, wait_s: float = 20.0) -> Path | None:
    link = Path("/dev/disk/by-label") / label
    deadline = time.monotonic() + wait_s
    while True:
        if link.exists():
            return link.resolve()
        found = subprocess.run(
            ["blkid", "-L", label], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            return Path(found)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def firstboot(home: Home, *, label: str = SEED_LABEL, wait_s: float = 20.0) -> int:
    """Read and apply the seed disk; report the outcome on the console and in HOME/seed.json."""
    device = find_seed_device(label, wait_s)
    try:
        if device is None:
            raise SeedError(
                f"no seed disk: attach a disk labelled {label} ('p2pfs appliance seed')"
            )
        with tempfile.TemporaryDirectory(prefix="p2pfs-seed-") as tmp:
            copy = Path(tmp) / "seed"
            _copy_seed(device, Path(tmp) / "mnt", copy)
            seed = read_seed(copy)
            apply_seed(home, copy, seed, system_root=Path("/"))
    except (SeedError, OSError, subprocess.CalledProcessError, P2pfsError) as e:
        error = str(e)
        if isinstance(e, subprocess.CalledProcessError):
            error = f"{' '.join(map(str, e.cmd))} failed: {(e.stderr or '').strip()}"
        with contextlib.suppress(P2pfsError, OSError):
            home.init()  # so 'p2pfs status' works and shows the error
        write_status(home, {"ok": False, "error": error, "time": int(time.time())})
        console(f"p2pfs appliance: SEED ERROR: {error}")
        console(f"p2pfs status: seed: {json.dumps(seed_status(home))}")
        console("p2pfs appliance: the daemon and Samba stay down until a good seed is attached")
        return 1
    status = {
        "ok": True,
        "error": None,
        "time": int(time.time()),
        "node": seed.node,
        "estate": seed.estate,
        "volumes": list(seed.volumes),
        "desktop_link": seed.listen,
        "desktops": sorted(seed.desktops),
    }
    write_status(home, status)
    (home.root / SEED_APPLIED).write_text(f"{int(time.time())}\n")
    console(
        f"p2pfs appliance: seed applied: node {seed.node} in estate {seed.estate}; "
        f"desktop link {seed.listen}, SMB \\\\{seed.listen.split(':')[0]}\\p2pfs"
    )
    return 0


def _copy_seed(device: Path, mnt: Path, dest: Path) -> None:
    mnt.mkdir()
    opts = "ro,nodev,nosuid,noexec"
    proc = subprocess.run(
        ["mount", "-o", opts, str(device), str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SeedError(f"the seed disk {device} cannot be mounted: {proc.stderr.strip()}")
    try:
        shutil.copytree(mnt, dest)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
