"""The estate's trust layer: enrolment, mutual TLS 1.3 over real loopback sockets, revocation,
endorsement, and hostile inputs. Real node homes under tmp_path; nothing of ours is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import run_cli

from p2pfs.errors import DecodeError, IntegrityError, NotFound, P2pfsError, SignatureError
from p2pfs.home import Home
from p2pfs.keys import SigningKey
from p2pfs.objects.model import codec
from p2pfs.trust import certs, enrolment, revocation
from p2pfs.trust.certs import PeerRejected
from p2pfs.trust.estate import Estate

pytestmark = pytest.mark.unit

HANDSHAKE_TIMEOUT = 10


def new_home(tmp_path: Path, name: str) -> Home:
    home = Home(tmp_path / name)
    home.init()
    return home


def enrol(admin: Home, home: Home) -> Estate:
    return enrolment.join(home, enrolment.approve(admin, enrolment.request_join(home)))


@dataclass
class World:
    admin_home: Home
    admin: Estate
    b_home: Home
    b: Estate
    c_home: Home
    c: Estate


@pytest.fixture
def world(tmp_path: Path) -> World:
    admin_home = new_home(tmp_path, "admin")
    admin = enrolment.init_estate(admin_home)
    b_home, c_home = new_home(tmp_path, "b"), new_home(tmp_path, "c")
    return World(
        admin_home, admin, b_home, enrol(admin_home, b_home), c_home, enrol(admin_home, c_home)
    )


def cert_der(home: Home) -> bytes:
    return ssl.PEM_cert_to_DER_cert((home.estate_dir / "node.pem").read_text())


# -- a real handshake over loopback ---------------------------------------------


@dataclass
class Outcome:
    """What one side of a connection ended with: the peer's node id, or why it failed."""

    peer: bytes | None = None
    version: str | None = None
    error: BaseException | None = None


async def connect(
    server: Estate,
    client: Estate | None,
    *,
    client_context: ssl.SSLContext | None = None,
) -> tuple[Outcome, Outcome]:
    """One TLS connection over 127.0.0.1; each side exchanges one byte after peer_node_id.

    As the network code does: take the peer's node id right after the handshake,
    before anything is read or sent; on PeerRejected, close.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    results = (Outcome(), Outcome())

    async def side(
        stream: trio.SSLStream[trio.SocketStream], me: Estate | None, out: Outcome, say: bytes
    ) -> None:
        try:
            await stream.do_handshake()
            out.version = stream.version()
            der = stream.getpeercert(binary_form=True)
            out.peer = me.peer_node_id(der) if me is not None else b""
            await stream.send_all(say)
            got = await stream.receive_some(1)
            if got != b"S" and got != b"C":
                raise trio.BrokenResourceError(f"connection ended ({got!r})")
        except (trio.BrokenResourceError, PeerRejected) as e:
            out.peer, out.error = None, e
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def serve() -> None:
        tcp = await listeners[0].accept()
        await side(
            trio.SSLStream(tcp, server.server_context(), server_side=True), server, results[0], b"S"
        )

    async def dial() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        ctx = client_context if client_context is not None else client.client_context()  # type: ignore[union-attr]
        await side(trio.SSLStream(tcp, ctx, server_hostname=None), client, results[1], b"C")

    with trio.fail_after(HANDSHAKE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(dial)
    await listeners[0].aclose()
    return results


async def test_members_handshake_over_loopback_and_learn_each_others_node_id(world: World) -> None:
    server, client = await connect(world.b, world.c)
    assert server.error is None and client.error is None
    assert server.peer == world.c_home.node_id()
    assert client.peer == world.b_home.node_id()
    assert server.version == client.version == "TLSv1.3"
    # The admin is a full member too, in both roles.
    server, client = await connect(world.admin, world.b)
    assert (server.peer, client.peer) == (world.b_home.node_id(), world.admin_home.node_id())
    server, client = await connect(world.c, world.admin)
    assert (server.peer, client.peer) == (world.admin_home.node_id(), world.c_home.node_id())


async def test_a_node_with_its_own_ca_gets_nothing_either_way(tmp_path: Path, world: World) -> None:
    rogue_home = new_home(tmp_path, "rogue")
    rogue = enrolment.init_estate(rogue_home)
    # The rogue dials a member: the member's handshake fails on the rogue's certificate.
    server, client = await connect(world.b, rogue)
    assert server.peer is None and isinstance(server.error, trio.BrokenResourceError)
    assert client.peer is None and client.error is not None
    # A member dials the rogue: it refuses the rogue's server certificate.
    server, client = await connect(rogue, world.b)
    assert client.peer is None and isinstance(client.error, trio.BrokenResourceError)
    assert server.peer is None
    # Even handed over outside TLS, the rogue's certificate proves nothing.
    with pytest.raises(PeerRejected, match="not issued by this estate's CA"):
        world.b.peer_node_id(cert_der(rogue_home))


async def test_client_without_certificate_or_with_tls12_is_refused(world: World) -> None:
    ca = (world.b_home.estate_dir / "ca.pem").read_text()
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cadata=ca)
    server, client = await connect(world.b, None, client_context=no_cert)
    assert server.peer is None and isinstance(server.error, trio.BrokenResourceError)
    assert client.peer is None

    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.check_hostname = False
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.load_verify_locations(cadata=ca)
    tls12.load_cert_chain(world.c_home.estate_dir / "node.pem", world.c_home.node_key)
    server, client = await connect(world.b, None, client_context=tls12)
    assert server.peer is None and client.peer is None
    assert isinstance(client.error, trio.BrokenResourceError)


# -- revocation -----------------------------------------------------------------


async def test_revocation_applies_at_once_on_a_running_node(world: World) -> None:
    c_id = world.c_home.node_id()
    server, _ = await connect(world.b, world.c)
    assert server.peer == c_id  # b's contexts are built and cached now
    old_list = world.b.revocation_list()

    assert enrolment.revoke(world.admin_home, c_id) == 2
    fresh = Estate.load(world.admin_home)
    assert fresh is not None and fresh.is_revoked(c_id)

    # b has not seen the list yet: c still gets in.
    server, _ = await connect(world.b, world.c)
    assert server.peer == c_id
    # The list reaches b's running Estate (as the network code hands it over): no restart.
    assert world.b.accept_revocation_list(fresh.revocation_list()) is True
    assert world.b.revocation_number == 2 and world.b.is_revoked(c_id)
    server, client = await connect(world.b, world.c)
    assert server.peer is None and isinstance(server.error, PeerRejected)
    assert "revoked" in str(server.error)
    assert client.peer is None
    _, client = await connect(world.c, world.b)  # and when b dials c
    assert client.peer is None and isinstance(client.error, PeerRejected)
    with pytest.raises(PeerRejected, match=f"node {c_id.hex()} is revoked"):
        world.b.peer_node_id(cert_der(world.c_home))
    # Everyone else is unaffected.
    assert world.b.peer_node_id(cert_der(world.admin_home)) == world.admin_home.node_id()

    # Stored atomically: a restarted b starts with list 2.
    reloaded = Estate.load(world.b_home)
    assert reloaded is not None and reloaded.revocation_number == 2
    assert reloaded.revocation_list() == fresh.revocation_list()
    # The same list again, or an older one, changes nothing.
    assert world.b.accept_revocation_list(fresh.revocation_list()) is False
    assert world.b.accept_revocation_list(old_list) is False
    assert world.b.revocation_number == 2 and world.b.is_revoked(c_id)
    # The admin will not approve the revoked key again.
    with pytest.raises(P2pfsError, match="revoked"):
        enrolment.approve(world.admin_home, enrolment.request_join(world.c_home))


def test_revocation_numbers_and_lists(world: World) -> None:
    b_id, c_id = world.b_home.node_id(), world.c_home.node_id()
    assert world.admin.revocation_number == 1 and world.admin.revoked == []
    assert enrolment.revoke(world.admin_home, b_id) == 2
    assert enrolment.revoke(world.admin_home, b_id) == 2  # already revoked: no new list
    assert enrolment.revoke(world.admin_home, c_id) == 3
    final = Estate.load(world.admin_home)
    assert final is not None and final.revoked == sorted([b_id, c_id])
    with pytest.raises(P2pfsError, match="admin node itself"):
        enrolment.revoke(world.admin_home, world.admin_home.node_id())
    with pytest.raises(P2pfsError, match="not the admin"):
        enrolment.revoke(world.b_home, c_id)
    with pytest.raises(P2pfsError, match="16 bytes"):
        enrolment.revoke(world.admin_home, b"short")
    # The admin's own running Estate catches up like anyone else's.
    assert world.admin.accept_revocation_list(final.revocation_list()) is True
    assert world.admin.revocation_number == 3


def test_forged_and_damaged_revocation_lists_are_refused(tmp_path: Path, world: World) -> None:
    rogue_home = new_home(tmp_path, "rogue")
    enrolment.init_estate(rogue_home)
    for _ in range(3):  # a rogue list with a higher number than ours
        enrolment.revoke(rogue_home, os.urandom(16))
    rogue = Estate.load(rogue_home)
    assert rogue is not None and rogue.revocation_number == 4
    with pytest.raises(SignatureError, match="not signed by this estate's CA"):
        world.b.accept_revocation_list(rogue.revocation_list())

    # A genuine list with its body altered (revoking someone else) no longer verifies.
    enrolment.revoke(world.admin_home, world.c_home.node_id())
    genuine = Estate.load(world.admin_home)
    assert genuine is not None
    outer = codec.unpack(genuine.revocation_list(), max_size=1 << 20)
    assert isinstance(outer, dict)
    body = codec.unpack(outer["list"], max_size=1 << 20)
    assert isinstance(body, dict)
    body["revoked"] = [world.b_home.node_id()]
    with pytest.raises(SignatureError):
        world.c.accept_revocation_list(codec.pack({"list": codec.pack(body), "sig": outer["sig"]}))

    for bad, error in [
        (b"", DecodeError),
        (b"\xc1garbage", DecodeError),
        (codec.pack([1, 2]), DecodeError),
        (codec.pack({"list": b"x", "sig": b"y"}), SignatureError),
        (b"\x00" * (revocation.MAX_REVOCATION_LIST + 1), DecodeError),
        (genuine.revocation_list()[:-1], DecodeError),
    ]:
        with pytest.raises(error):
            world.b.accept_revocation_list(bad)
    assert world.b.revocation_number == 1 and not world.b.is_revoked(world.c_home.node_id())
    # Every single-bit change of a genuine list is refused, never a traceback.
    data = genuine.revocation_list()
    for i in range(len(data)):
        for bit in range(8):
            with pytest.raises(P2pfsError):
                world.b.accept_revocation_list(
                    data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
                )
    assert world.b.accept_revocation_list(data) is True


# -- enrolment ------------------------------------------------------------------


def test_enrolment_flow_and_files(tmp_path: Path, world: World) -> None:
    admin, b = world.admin, world.b
    assert admin.is_admin and not b.is_admin and not world.c.is_admin
    assert len(admin.estate_id) == 16
    assert admin.estate_id == b.estate_id == world.c.estate_id
    assert admin.node_id == world.admin_home.node_id()
    assert b.node_id == world.b_home.node_id()
    assert b.revocation_number == 1 and b.revoked == []

    d = world.admin_home.estate_dir
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert not (world.b_home.estate_dir / "ca.key").exists()  # the CA key stays on the admin
    assert {p.name for p in world.b_home.estate_dir.iterdir()} == {
        "ca.pem",
        "node.pem",
        "revocations",
    }

    loaded = Estate.load(world.b_home)
    assert loaded is not None
    assert (loaded.estate_id, loaded.node_id, loaded.is_admin) == (b.estate_id, b.node_id, False)
    assert Estate.load(new_home(tmp_path, "outsider")) is None

    # The node's private key is in neither the request nor the bundle.
    secret = SigningKey.load(world.b_home.node_key).private_key.private_bytes_raw()
    request = enrolment.request_join(world.b_home)
    assert request.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    bundle = enrolment.approve(world.admin_home, request)
    assert secret not in request and secret not in base64.b64decode(
        b"".join(request.splitlines()[1:-1])
    )
    assert secret not in bundle
    # Re-joining the same estate (a renewed certificate) is allowed.
    assert enrolment.join(world.b_home, bundle).estate_id == admin.estate_id

    with pytest.raises(P2pfsError, match="already holds estate"):
        enrolment.init_estate(world.admin_home)
    with pytest.raises(P2pfsError, match=r"already .*member"):
        enrolment.init_estate(world.b_home)
    with pytest.raises(P2pfsError, match="not the admin"):
        enrolment.approve(world.b_home, enrolment.request_join(world.c_home))
    with pytest.raises(NotFound, match="holds no estate"):
        enrolment.approve(new_home(tmp_path, "nobody"), request)


def _csr(key: SigningKey | ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    private = key.private_key if isinstance(key, SigningKey) else key
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(private, None if isinstance(key, SigningKey) else _sha256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _sha256() -> object:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _pem(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode()])
        + b"\n"
    )


def test_join_requests_must_be_made_by_the_key_they_name(world: World) -> None:
    b_key = SigningKey.load(world.b_home.node_key)
    # b's key, but claiming to be c.
    forged = _csr(b_key, world.c_home.node_id().hex())
    with pytest.raises(P2pfsError, match=r"names node .* but its key is node"):
        enrolment.approve(world.admin_home, forged)
    # A signature that does not verify.
    der = x509.load_pem_x509_csr(enrolment.request_join(world.b_home)).public_bytes(
        serialization.Encoding.DER
    )
    broken = _pem(der[:-1] + bytes([der[-1] ^ 1]), "CERTIFICATE REQUEST")
    with pytest.raises(SignatureError, match="signature does not verify"):
        enrolment.approve(world.admin_home, broken)
    # Not an Ed25519 key.
    with pytest.raises(P2pfsError, match="not an Ed25519 key"):
        enrolment.approve(world.admin_home, _csr(ec.generate_private_key(ec.SECP256R1()), "x"))
    for bad, text in [
        (b"", "empty"),
        (b"hello", "not a PEM certificate signing request"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        (b"A" * (certs.MAX_REQUEST + 1), "limit"),
    ]:
        with pytest.raises(DecodeError, match=text):
            enrolment.approve(world.admin_home, bad)


def test_join_refuses_bundles_not_made_for_this_node(tmp_path: Path, world: World) -> None:
    d_home = new_home(tmp_path, "d")
    bundle_for_b = enrolment.approve(world.admin_home, enrolment.request_join(world.b_home))
    with pytest.raises(PeerRejected, match=r"issued for node .* not for this node"):
        enrolment.join(d_home, bundle_for_b)
    assert Estate.load(d_home) is None  # nothing stored

    # d's own certificate, but presented with a rogue CA in place of the estate's.
    rogue_home = new_home(tmp_path, "rogue")
    rogue = enrolment.init_estate(rogue_home)
    doc = codec.unpack(
        enrolment.approve(world.admin_home, enrolment.request_join(d_home)), max_size=1 << 21
    )
    assert isinstance(doc, dict)
    swapped = dict(
        doc,
        ca=ssl.PEM_cert_to_DER_cert((rogue_home.estate_dir / "ca.pem").read_text()),
        estate=rogue.estate_id,
    )
    with pytest.raises(PeerRejected, match="not issued by this estate's CA"):
        enrolment.join(d_home, codec.pack(swapped))
    with pytest.raises(IntegrityError, match="another estate"):
        enrolment.join(d_home, codec.pack(dict(doc, estate=rogue.estate_id)))
    with pytest.raises(SignatureError):  # the rogue's revocation list
        enrolment.join(d_home, codec.pack(dict(doc, revocations=rogue.revocation_list())))
    assert Estate.load(d_home) is None

    # A member of one estate does not silently move to another.
    rogue_bundle = enrolment.approve(rogue_home, enrolment.request_join(world.b_home))
    with pytest.raises(P2pfsError, match="already a member of estate"):
        enrolment.join(world.b_home, rogue_bundle)
    with pytest.raises(P2pfsError, match="the estate's admin"):
        enrolment.join(
            world.admin_home,
            enrolment.approve(world.admin_home, enrolment.request_join(world.admin_home)),
        )

    good = codec.pack(doc)
    for bad, text in [
        (b"", "empty"),
        (b"\x00" * (enrolment.MAX_BUNDLE + 1), "limit"),
        (codec.pack({"format": "something else"}), "not a p2pfs join bundle"),
        (codec.pack(dict(doc, v=2)), "version 2"),
        (codec.pack(dict(doc, extra=1)), "exactly"),
        (codec.pack(dict(doc, node="not bytes")), "'node' must be bytes"),
        (codec.pack(dict(doc, node=b"\x30\x03junk")), "not an X.509 certificate"),
        (good[: len(good) // 2], "not a p2pfs bundle"),
    ]:
        with pytest.raises(P2pfsError, match=text):
            enrolment.join(d_home, bad)
    # Every single-bit change is refused with a P2pfsError, never a traceback (this
    # found the unused-bits byte of the signature BIT STRING, which verifiers ignore).
    for i in range(len(good)):
        for bit in range(8):
            with pytest.raises(P2pfsError):
                enrolment.join(d_home, good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1 :])
    assert Estate.load(d_home) is None
    assert enrolment.join(d_home, good).node_id == d_home.node_id()


def test_peer_node_id_refuses_garbage_certificates(world: World) -> None:
    for bad in [b"", b"\x30\x00", os.urandom(500), b"\x30" * (certs.MAX_CERT + 1)]:
        with pytest.raises(PeerRejected):
            world.b.peer_node_id(bad)
    # The CA certificate is the estate's but carries no node id.
    ca = ssl.PEM_cert_to_DER_cert((world.b_home.estate_dir / "ca.pem").read_text())
    with pytest.raises(PeerRejected):
        world.b.peer_node_id(ca)
    assert world.b.peer_node_id(cert_der(world.c_home)) == world.c_home.node_id()


def test_damaged_estate_files_give_clear_errors(world: World) -> None:
    d = world.b_home.estate_dir
    originals = {name: (d / name).read_bytes() for name in ("ca.pem", "node.pem", "revocations")}
    cases: list[tuple[str, bytes, type[P2pfsError], str]] = [
        ("node.pem", b"garbage", DecodeError, "node.pem is not an X.509 certificate"),
        ("node.pem", b"x" * (certs.MAX_CERT + 1), DecodeError, "larger than the limit"),
        ("ca.pem", originals["node.pem"], IntegrityError, "ca.pem is not a self-signed"),
        (
            "node.pem",
            (world.c_home.estate_dir / "node.pem").read_bytes(),
            IntegrityError,
            "belongs to node",
        ),
        ("revocations", originals["revocations"][:-3], IntegrityError, "revocations is damaged"),
        ("revocations", b"", IntegrityError, "revocations is damaged"),
    ]
    for name, data, error, text in cases:
        (d / name).write_bytes(data)
        with pytest.raises(error, match=text):
            Estate.load(world.b_home)
        (d / name).write_bytes(originals[name])
    (d / "ca.pem").unlink()
    with pytest.raises(NotFound, match=r"ca\.pem does not exist"):
        Estate.load(world.b_home)
    (d / "ca.pem").write_bytes(originals["ca.pem"])
    assert Estate.load(world.b_home) is not None

    # On the admin: a CA key that is not the CA certificate's.
    SigningKey.generate().save(world.admin_home.estate_dir / "ca.key", overwrite=True)
    with pytest.raises(IntegrityError, match=r"ca\.key does not match"):
        Estate.load(world.admin_home)
    # An interrupted 'estate init' (CA key, no node certificate) is named as such.
    (world.admin_home.estate_dir / "node.pem").unlink()
    with pytest.raises(P2pfsError, match="interrupted"):
        Estate.load(world.admin_home)


# -- endorsement ----------------------------------------------------------------


def test_volume_endorsement(tmp_path: Path, world: World) -> None:
    vid = SigningKey.generate().public_bytes()
    other_vid = SigningKey.generate().public_bytes()
    sig = enrolment.endorse(world.admin_home, vid, "tools")
    assert sig == world.admin.endorse(vid, "tools")  # Ed25519 is deterministic
    world.b.verify_endorsement(vid, "tools", sig)
    world.admin.verify_endorsement(vid, "tools", sig)
    with pytest.raises(SignatureError, match="not endorsed"):
        world.b.verify_endorsement(vid, "tool", sig)
    with pytest.raises(SignatureError, match="not endorsed"):
        world.b.verify_endorsement(other_vid, "tools", sig)
    with pytest.raises(SignatureError):
        world.b.verify_endorsement(vid, "tools", sig[:-1] + bytes([sig[-1] ^ 1]))
    with pytest.raises(SignatureError):
        world.b.verify_endorsement(vid[:16], "tools", sig)
    with pytest.raises(SignatureError):
        world.b.verify_endorsement(vid, "", sig)
    # Another estate's endorsement means nothing here, and ours nothing there.
    rogue_home = new_home(tmp_path, "rogue")
    rogue = enrolment.init_estate(rogue_home)
    with pytest.raises(SignatureError):
        world.b.verify_endorsement(vid, "tools", rogue.endorse(vid, "tools"))
    with pytest.raises(SignatureError):
        rogue.verify_endorsement(vid, "tools", sig)
    # Only the admin endorses; the endorsement is not a node-key signature either.
    with pytest.raises(P2pfsError, match="only the admin"):
        world.b.endorse(vid, "tools")
    with pytest.raises(P2pfsError, match="not the admin"):
        enrolment.endorse(world.b_home, vid, "tools")
    with pytest.raises(SignatureError):
        world.b.verify_endorsement(
            vid, "tools", SigningKey.load(world.admin_home.node_key).sign(vid + b"tools")
        )


# -- the command line -----------------------------------------------------------


def _ok(home: Path, *args: str) -> str:
    return run_cli(home, *args, check=True).stdout


def test_cli_enrolment_revocation_and_show(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(a, "init")
    _ok(b, "init")
    estate_id = _ok(a, "estate", "init").strip()
    assert len(bytes.fromhex(estate_id)) == 16

    req, bundle = tmp_path / "b.req", tmp_path / "b.bundle"
    _ok(b, "request-join", "--out", str(req))
    assert req.read_bytes().startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    assert run_cli(b, "request-join", "--out", "-", check=True).stdout.startswith(
        "-----BEGIN CERTIFICATE REQUEST-----"
    )
    b_id = _ok(a, "estate", "approve", str(req), "--out", str(bundle)).strip()
    assert b_id == Home(b).node_id().hex()
    assert f"joined estate {estate_id} as node {b_id}" in _ok(b, "join", str(bundle))

    shown = json.loads(_ok(b, "estate", "show", "--json"))
    assert shown["estate_id"] == estate_id and shown["node_id"] == b_id
    assert shown["is_admin"] is False and shown["revocation_number"] == 1 and shown["revoked"] == []
    assert shown["certificate_expires"] > "2025"
    assert "admin" in _ok(a, "estate", "show")

    assert "revocation list 2" in _ok(a, "estate", "revoke", b_id)
    shown = json.loads(_ok(a, "estate", "show", "--json"))
    assert shown["revocation_number"] == 2 and shown["revoked"] == [b_id]

    # User errors: one quiet line, a documented exit code, no traceback.
    for home, args, code, text in [
        (a, ["estate", "init"], 1, "already holds estate"),
        (b, ["estate", "approve", str(req), "--out", str(bundle)], 1, "not the admin"),
        (
            a,
            ["estate", "approve", str(tmp_path / "missing"), "--out", str(bundle)],
            3,
            "does not exist",
        ),
        (a, ["estate", "approve", str(bundle), "--out", str(bundle)], 4, "not a PEM"),
        (b, ["join", str(req)], 4, "not a p2pfs bundle"),
        (a, ["estate", "revoke", "xyz"], 2, "not hexadecimal"),
        (a, ["estate", "revoke", Home(a).node_id().hex()], 1, "admin node itself"),
    ]:
        proc = run_cli(home, *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert text in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    outsider = tmp_path / "c"
    _ok(outsider, "init")
    assert "joined no estate" in _ok(outsider, "estate", "show")
    assert json.loads(_ok(outsider, "estate", "show", "--json"))["estate_id"] is None
