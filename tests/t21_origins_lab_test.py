"""Origins in the lab: an S3 API server (moto's, its own process) and nginx, in hosts of
their own; the publisher uploads, desktops read from peers and the origin, and follow
its ``latest`` with the publisher gone.

Hosts: ``a`` publishes, ``d1`` and ``d2`` are desktops, ``s3`` runs the S3 server,
``web`` nginx. Every byte a desktop reads is compared with the source; a broken
origin (a wrong byte, a truncated object, a stale ``latest``, down) must give correct
bytes from elsewhere or EIO within the deadline, never a wrong byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import file_sha256 as _sha
from harness import require_lab

from p2pfs.lab.estate import EstateLab, Node, estate_lab, wait_for
from p2pfs.lab.netns import Host
from p2pfs.lab.servers import start_s3
from p2pfs.origin.layout import LATEST, object_key

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
DEADLINE_S = 3.0
BUCKET = "estate-tools"
S3_PORT = 9000
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _write(path: Path, size: int, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return _sha(path)


def _env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return out | ENV


def _in(
    host: Host, *argv: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = host.run(argv, capture_output=True, timeout=120, env=_env(), text=True, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def _cli(node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A p2pfs command in the node's own host (it talks to the lab's S3 server)."""
    return _in(
        node.host, sys.executable, "-m", "p2pfs", "--home", str(node.home), *args, check=check
    )


def _s3(host: Host, endpoint: str, code: str) -> Any:
    """Run boto3 ``code`` (with ``s3`` a client, ``bucket``) in ``host``; its JSON result."""
    prelude = (
        "import boto3, json, sys\n"
        f"s3 = boto3.client('s3', endpoint_url={endpoint!r})\n"
        f"bucket = {BUCKET!r}\n"
        "result = None\n"
    )
    proc = _in(host, sys.executable, "-", input=prelude + code + "\nprint(json.dumps(result))")
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_lab()
    saved_env = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the daemons' credentials: the usual AWS environment
    work = tmp_path_factory.mktemp("origins")
    tree = work / "tree"
    digests = {
        "big.img": _write(tree / "big.img", 12 * MIB, 1),
        "docs/a.txt": _write(tree / "docs" / "a.txt", 300_000, 2),
        "cold.bin": _write(tree / "cold.bin", 3 * MIB, 3),
        "later.bin": _write(tree / "later.bin", 2 * MIB, 4),
    }
    with estate_lab(work, ["a", "d1", "d2"]) as lab:
        s3 = start_s3(lab.lab.add_host("s3"), S3_PORT, workdir=work / "moto")
        endpoint = s3.endpoint
        assert s3.proc is not None
        moto_proc = s3.proc
        a = lab.admin
        _s3(a.host, endpoint, "s3.create_bucket(Bucket=bucket)")
        lab.publish(tree)
        for node in lab.nodes:
            node.configure(deadline_s=DEADLINE_S, hedge_after_s=0.3, origin_poll_s=1.0)
        yield {
            "lab": lab,
            "endpoint": endpoint,
            "digests": digests,
            "tree": tree,
            "work": work,
            "moto": moto_proc,
        }
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _origin_objects(world: dict[str, Any]) -> dict[str, str]:
    """Every object key at the origin with its LastModified (the server's own record)."""
    lab: EstateLab = world["lab"]
    return dict(
        _s3(
            lab.admin.host,
            world["endpoint"],
            "pages = s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix='tools/objects/')\n"
            "result = [[o['Key'], o['LastModified'].isoformat()] for p in pages for o in p.get('Contents', [])]",
        )
    )


def test_1_sync_uploads_then_resumes_with_only_what_is_missing(world: dict[str, Any]) -> None:
    lab: EstateLab = world["lab"]
    a = lab.admin
    url = f"s3://{BUCKET}/tools"
    out = _cli(a, "origin", "add", "tools", url, "--endpoint", world["endpoint"])
    assert "origin s3://" in out.stdout
    # Killed half way: a sync stopped by SIGKILL after some objects went up (over a
    # slow link, so that it is still under way when the kill comes).
    a.host.shape(20)
    argv = [sys.executable, "-m", "p2pfs", "--home", str(a.home), "origin", "sync", "tools"]
    proc = a.host.popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("some objects at the origin", lambda: len(_origin_objects(world)) >= 5, 60)
    proc.kill()
    proc.wait()
    a.host.unshape()
    before = _origin_objects(world)
    report = json.loads(_cli(a, "origin", "sync", "tools", "--json").stdout)[0]
    after = _origin_objects(world)
    assert report["present"] >= len(before) > 0
    assert report["uploaded"] == report["objects"] - report["present"]
    assert len(after) == report["objects"]
    # What the first run uploaded was not uploaded again (the server's own timestamps).
    assert all(after[k] == t for k, t in before.items())
    again = json.loads(_cli(a, "origin", "sync", "tools", "--json").stdout)[0]
    assert again["uploaded"] == 0 and again["present"] == again["objects"]
    rows = json.loads(_cli(a, "origin", "list", "--json").stdout)
    assert rows[0]["reachable"] and rows[0]["lag"] == 0 and rows[0]["objects"] == report["objects"]


def _reads(node: Node, digests: dict[str, str], names: list[str]) -> None:
    for name in names:
        assert _sha(node.mountpoint / "tools" / name) == digests[name], name


def test_2_desktops_read_from_the_origin_with_the_publisher_gone(world: dict[str, Any]) -> None:
    lab: EstateLab = world["lab"]
    a, d1, d2 = lab.nodes
    digests = world["digests"]
    lab.start_all()
    for d in (d1, d2):
        wait_for(f"{d.name} to follow the origins' snapshot", lambda d=d: _announces(d), 60)
    _reads(d1, digests, ["docs/a.txt"])
    a.stop()  # for good
    _reads(d1, digests, ["big.img"])
    _reads(d2, digests, ["big.img", "docs/a.txt"])
    # Nobody had big.img when the publisher stopped: all of it came from the S3 origin
    # (through d1 or d2, whichever was a chunk's home), about once.
    from_origin = sum(d.status()["bytes_from"]["origin"] for d in (d1, d2))
    assert 12 * MIB <= from_origin < 2 * 12 * MIB + MIB


def _announces(node: Node) -> bool:
    rows = json.loads(_cli(node, "origin", "list", "--json").stdout)
    return any(r["reachable"] for r in rows)


def test_3_a_broken_origin_never_gives_a_wrong_byte(world: dict[str, Any]) -> None:
    lab: EstateLab = world["lab"]
    a, d1, d2 = lab.nodes
    endpoint = world["endpoint"]
    # cold.bin: nobody read it; its chunks are only at the origin. Corrupt one object,
    # truncate another (as a half-written mirror would).
    chunk_keys = _chunk_keys_of(world, "cold.bin")
    assert len(chunk_keys) >= 2
    bad, short = chunk_keys[0], chunk_keys[1]
    saved = _s3(
        a.host,
        endpoint,
        f"import base64\nresult = [base64.b64encode(s3.get_object(Bucket=bucket, Key=k)['Body'].read()).decode() for k in {[bad, short]!r}]",
    )
    _s3(
        a.host,
        endpoint,
        "import base64\n"
        f"b = bytearray(base64.b64decode({saved[0]!r})); b[100] ^= 1\n"
        f"s3.put_object(Bucket=bucket, Key={bad!r}, Body=bytes(b))\n"
        f"s3.put_object(Bucket=bucket, Key={short!r}, Body=base64.b64decode({saved[1]!r})[:1000])",
    )
    path = d1.mountpoint / "tools" / "cold.bin"
    start = time.monotonic()
    with pytest.raises(OSError) as e, open(path, "rb") as f:
        f.read()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - start < 60
    assert sum(d.status()["corrupt_chunks_rejected"] for d in (d1, d2)) >= 1
    # Repaired at the origin: the same read now gives exactly the source's bytes.
    _s3(
        a.host,
        endpoint,
        "import base64\n"
        f"s3.put_object(Bucket=bucket, Key={bad!r}, Body=base64.b64decode({saved[0]!r}))\n"
        f"s3.put_object(Bucket=bucket, Key={short!r}, Body=base64.b64decode({saved[1]!r}))",
    )
    _reads(d1, world["digests"], ["cold.bin"])


def _chunk_keys_of(world: dict[str, Any], name: str) -> list[str]:
    """The origin keys of a file's chunks, from the publisher's store (by its layout)."""
    lab: EstateLab = world["lab"]
    from p2pfs.home import Home
    from p2pfs.objects.model import decode_blob, decode_snapshot, decode_tree
    from p2pfs.store.cas import Store
    from p2pfs.volume.registry import VolumeRegistry

    home = Home(lab.admin.home)
    store = Store(home.store_dir)
    try:
        record = VolumeRegistry(home).get("tools")
        assert record.head is not None
        snap = decode_snapshot(store.get_object(record.head))
        tree = decode_tree(store.get_object(snap.root))
        entry = next(e for e in tree.entries if e.name == name.encode())
        assert entry.id is not None
        blob = decode_blob(store.get_object(entry.id))
        return ["tools/" + object_key(r.id) for r in blob.refs]
    finally:
        store.close()


def test_4_a_stale_latest_or_a_dead_origin(world: dict[str, Any]) -> None:
    lab: EstateLab = world["lab"]
    a, d1, d2 = lab.nodes
    endpoint = world["endpoint"]
    seq = d2.status()["volumes"][0]["seq"]
    # A stale latest (an older snapshot put back, as a lagging mirror or an attacker
    # would): followers stay where they are.
    old = _s3(
        a.host,
        endpoint,
        "import base64\nkeys = [o['Key'] for o in s3.list_objects_v2(Bucket=bucket, Prefix='tools/snapshots/')['Contents']]\n"
        "result = base64.b64encode(s3.get_object(Bucket=bucket, Key=sorted(keys)[0])['Body'].read()).decode()",
    )
    current = _s3(
        a.host,
        endpoint,
        f"import base64\nresult = base64.b64encode(s3.get_object(Bucket=bucket, Key='tools/{LATEST}')['Body'].read()).decode()",
    )
    _s3(
        a.host,
        endpoint,
        f"import base64\ns3.put_object(Bucket=bucket, Key='tools/{LATEST}', Body=base64.b64decode({old!r}))",
    )
    time.sleep(3)  # three polls
    assert d2.status()["volumes"][0]["seq"] == seq
    _s3(
        a.host,
        endpoint,
        f"import base64\ns3.put_object(Bucket=bucket, Key='tools/{LATEST}', Body=base64.b64decode({current!r}))",
    )
    # The origin down: what was read stays readable, anything else is EIO within the deadline.
    moto: subprocess.Popen[bytes] = world["moto"]
    moto.send_signal(signal.SIGSTOP)
    try:
        _reads(d1, world["digests"], ["big.img"])
        start = time.monotonic()
        with pytest.raises(OSError) as e, open(d2.mountpoint / "tools" / "later.bin", "rb") as f:
            f.read()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - start < 60
    finally:
        moto.send_signal(signal.SIGCONT)
    _reads(d2, world["digests"], ["later.bin"])


def _seq(node: Node) -> int:
    return int(node.status()["volumes"][0]["seq"])


def test_5_a_new_admin_machine_takes_over_from_the_backup_and_the_bucket(
    world: dict[str, Any],
) -> None:
    """The publisher is gone for good (test 2 stopped it): its backup and the bucket let
    a new machine continue the volume's sequence, and every follower takes it."""
    lab: EstateLab = world["lab"]
    a, d1, d2 = lab.nodes[:3]
    work: Path = world["work"]
    passphrase = work / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    backup = work / "estate.backup"
    a.cli("estate", "backup", "--out", str(backup), "--passphrase-file", str(passphrase))
    n = Node("n", lab.lab.add_host("n"), work / "n" / "home", work / "n" / "mnt")
    lab.nodes.append(n)  # stopped with the others
    n.cli("init")
    n.cli("estate", "restore", str(backup), "--passphrase-file", str(passphrase))
    n.configure(deadline_s=DEADLINE_S, hedge_after_s=0.3, origin_poll_s=1.0)
    old = _seq(d1)
    url = f"s3://{BUCKET}/tools"
    out = _cli(n, "volume", "restore", "tools", "--from", url, "--endpoint", world["endpoint"])
    assert f"snapshot {old}" in out.stdout, out.stdout
    # Its writable mount shows the restored head: the old admin's tree, whose objects
    # only the origin and the peers hold. Written through it and committed: the next seq.
    n.start()
    digests = world["digests"]
    mine = n.mountpoint / "tools"
    assert _sha(mine / "docs" / "a.txt") == digests["docs/a.txt"]
    for name, size, seed in (("v2.bin", 1 * MIB, 5), ("http.bin", 2 * MIB, 6)):
        data = random.Random(seed).randbytes(size)
        (mine / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    committed = json.loads(n.cli("commit", "tools", "--json").stdout)
    assert committed["seq"] == old + 1
    for d in (d1, d2):
        wait_for(f"{d.name} to take the new admin's snapshot", lambda d=d: _seq(d) == old + 1, 60)
    _reads(d1, digests, ["v2.bin", "big.img"])
    _reads(d2, digests, ["v2.bin"])
    # The new admin uploaded its snapshot: the origin's latest is it.
    rows = json.loads(_cli(n, "origin", "list", "--json").stdout)
    wait_for(
        "the new snapshot at the origin",
        lambda: json.loads(_cli(n, "origin", "list", "--json").stdout)[0]["seq"] == old + 1,
        60,
    )
    assert rows[0]["reachable"]
    # A replayed old snapshot (the old admin's, put back as latest) is still refused.
    first = work / "first-snapshot"
    _s3(
        n.host,
        world["endpoint"],
        "keys = sorted(o['Key'] for o in s3.list_objects_v2(Bucket=bucket, Prefix='tools/snapshots/')['Contents'])\n"
        f"open({str(first)!r}, 'wb').write(s3.get_object(Bucket=bucket, Key=keys[0])['Body'].read())\n"
        f"s3.put_object(Bucket=bucket, Key='tools/{LATEST}', Body=open({str(first)!r}, 'rb').read())",
    )
    time.sleep(3)
    assert _seq(d1) == _seq(d2) == old + 1


def test_6_a_plain_http_mirror_served_by_nginx(world: dict[str, Any]) -> None:
    """An HTTP origin written by the publisher into a directory nginx serves: with the
    S3 origin and every holder gone, a desktop reads from it alone."""
    from p2pfs.lab.servers import start_nginx

    lab: EstateLab = world["lab"]
    d1, d2, n = lab.nodes[1], lab.nodes[2], lab.nodes[3]
    work: Path = world["work"]
    root = work / "www"
    (root / "tools").mkdir(parents=True)
    web = start_nginx(lab.lab.add_host("web"), root)
    url = web.url.rstrip("/") + "/tools/"
    _cli(n, "origin", "add", "tools", url, "--dir", str(root / "tools"))
    seq = _seq(n)
    for d in (d1, d2):
        wait_for(f"{d.name} to learn of the mirror", lambda d=d: _seq(d) == seq, 60)
    wait_for(
        "the mirror filled",
        lambda: any(
            r["url"] == url and r["seq"] == seq
            for r in json.loads(_cli(n, "origin", "list", "--json").stdout)
        ),
        60,
    )
    n.stop()
    moto: subprocess.Popen[bytes] = world["moto"]
    moto.send_signal(signal.SIGSTOP)
    try:
        _reads(d2, world["digests"], ["http.bin"])
    finally:
        moto.send_signal(signal.SIGCONT)
    served = [r for r in web.requests() if "/tools/objects/" in r[1] and r[2] == 200]
    assert sum(r[3] for r in served) >= 2 * MIB
