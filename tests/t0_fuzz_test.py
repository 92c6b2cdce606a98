"""Every decoder of hostile input, fuzzed: it returns a value or raises a P2pfsError.

Targets are in ``fuzz_targets.py`` (frames, messages, objects, the signed lists,
enrolment, the estate backup, the desktop link and its tokens, the config and the
appliance seed). Each
gets three kinds of input, mixed: random bytes; structurally valid msgpack (or JSON,
TOML, text) of random shapes, with the fields the decoder expects given plausible and
implausible values; and mutations of a valid encoding (bit flips, truncations,
insertions, repeated runs), which is what reaches the deep checks. Anything but a
``P2pfsError`` (TypeError, RecursionError, OverflowError, ...) fails the test, and
Hypothesis shrinks the input.

A short run (about 150 examples per target) is part of ``make test``.
``P2PFS_FUZZ_EXAMPLES=N`` multiplies every count by N for a long run; the executions
per target are asserted, and printed at the end of the module (with ``-s``).
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Iterator
from typing import Any

import msgpack  # tests only: non-canonical and float-bearing msgpack, which codec refuses
import pytest
from fuzz_targets import (
    ACCEPTED,
    BACKUP_CONTENTS,
    EXECUTIONS,
    SEALED_BACKUP,
    SEED_TOML,
    TARGETS,
    check,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfs import config
from p2pfs.errors import P2pfsError, UsageError
from p2pfs.objects import codec

pytestmark = pytest.mark.unit

MULTIPLIER = int(os.environ.get("P2PFS_FUZZ_EXAMPLES", "1") or "1")
BASE_EXAMPLES = 150
# The slow targets (X.509 parsing, signing, files written per example) get fewer.
SLOW = {"bundle", "seed-bundle", "request", "cert", "access-body", "revocations-body"}


def planned(name: str) -> int:
    return (BASE_EXAMPLES // 2 if name in SLOW else BASE_EXAMPLES) * MULTIPLIER


# -- strategies -----------------------------------------------------------------------

INT_EDGES = [0, 1, -1, 2**7, 2**8, 2**16, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, -(2**63)]
ints = st.one_of(
    st.sampled_from([*INT_EDGES, 2**64 - 1, 2**40, 2**40 + 1]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-3, max_value=300),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True),
    st.binary(max_size=70),
    st.sampled_from([bytes(16), bytes(32), bytes(64), b"\xff" * 32]),
    st.text(max_size=40),
    st.sampled_from(["tools", "", ".", "..", "a/b", "x" * 65, "-x", "v"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=8),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)), inner, max_size=6),
    ),
    max_leaves=24,
)


def encode_msgpack(value: object) -> bytes:
    """Canonical when the value allows it (to get past the objects' canonical check),
    else whatever msgpack writes (floats, unsorted keys)."""
    try:
        return codec.pack(value)
    except (TypeError, ValueError):
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data


any_msgpack = st.builds(encode_msgpack, values)
# Also int map keys and long forms, which the canonical encoder never writes.
raw_msgpack = st.builds(
    lambda v: msgpack.packb(v, use_bin_type=True, strict_types=False),
    st.dictionaries(ints, values, max_size=4) | values,
)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps with (most of) the fields a decoder expects, each with a plausible value or
    anything at all, and sometimes an extra field."""
    return st.fixed_dictionaries(
        {},
        optional={k: st.one_of(v, values) for k, v in fields.items()} | {"zz": values, "": values},
    )


def ids(n: int = 32) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(min_size=n, max_size=n), st.binary(max_size=n + 2))


volume_heads = st.lists(
    st.one_of(st.sampled_from(["tools", "a", "x" * 64]), ids(), ints, ids(), st.none(), ids(16)),
    min_size=5,
    max_size=7,
)
HEADER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "t": st.sampled_from(
        ["hello", "announce", "get", "have", "snapshot", "digest", "revoked", "access", "r"]
    ),
    "id": ints,
    "node": ids(16),
    "estate": ids(16),
    "v": ints,
    "vols": st.lists(volume_heads, max_size=3),
    "vol": volume_heads,
    "crl": ints,
    "acl": ints,
    "cid": ids(),
    "fetch": st.booleans(),
    "ids": st.lists(ids(), max_size=4),
    "vid": ids(),
    "gen": ints,
    "k": ints,
    "n": ints,
    "err": st.one_of(st.text(), st.binary()),
    "bits": st.binary(max_size=4),
}
headers = shaped(HEADER_FIELDS)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A frame with its lengths right, or off by a little, around a header of any shape."""
    head = draw(st.one_of(st.builds(encode_msgpack, headers), any_msgpack))
    payload = draw(st.binary(max_size=130))
    total = 2 + len(head) + len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, -3]))
    head_len = len(head) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    return (
        max(total, 0).to_bytes(4, "big")
        + max(head_len, 0).to_bytes(2, "big")
        + head
        + payload
        + draw(st.binary(max_size=8))
    )


def obj(kind: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    both = {"v": st.just(1), "t": st.sampled_from([kind, kind, "blob", "tree"])} | fields
    return st.builds(encode_msgpack, shaped(both))


refs = st.lists(st.lists(st.one_of(ids(), ids(64), ints), max_size=3), max_size=5)
# An entry's optional fields: owner, rdev (major, minor) and user.* xattrs, plausible or not.
entry_extra = shaped(
    {
        "o": st.lists(ints, max_size=3),
        "r": st.lists(ints, max_size=3),
        "x": st.dictionaries(
            st.one_of(st.sampled_from([b"user.a", b"user.", b"trusted.a", b"user.b"]), st.text()),
            st.one_of(st.binary(max_size=8), ints),
            max_size=3,
        ),
    }
)
entry = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=8),
        st.sampled_from([1, 2, 3, 0, 4, 5, 6, 7, 8]),
        ints,
        ids(),
        entry_extra,
    ),
    min_size=6,
    max_size=9,
)
params = shaped(
    {"algorithm": st.sampled_from(["fastcdc", ""]), "min": ints, "avg": ints, "max": ints}
)
snapshot_fields = {
    "vol": ids(),
    "name": st.sampled_from(["tools", "x" * 65, ".a"]),
    "seq": ints,
    "parent": st.one_of(st.none(), ids()),
    "root": ids(),
    "time": ints,
    "params": params,
    "sig": ids(64),
    "epoch": ints,
    "rkey": st.binary(max_size=130),
    "ids": ids(),
}
node_lists = st.lists(ids(16), max_size=4)
access_row = st.lists(
    st.one_of(ids(), st.just("secret"), node_lists, ints, st.lists(st.lists(values, max_size=3))),
    min_size=5,
    max_size=7,
)
list_fields = {"v": st.just(1), "estate": ids(16), "n": ints, "issued": ints}
signed_outer = st.builds(encode_msgpack, shaped({"list": any_msgpack, "sig": ids(64)}))

JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # json writes Infinity and NaN, which json.loads takes back
        st.text(max_size=70),
        st.sampled_from(["ab" * 32, "73" * 32, "alice", "zz"]),
    ),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=16,
)


def json_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    shapes = st.fixed_dictionaries(
        {}, optional={k: st.one_of(v, JSON_VALUES) for k, v in fields.items()}
    )
    return st.builds(lambda d: json.dumps(d).encode(), st.one_of(shapes, JSON_VALUES))


token_json = json_of(
    {
        "format": st.just("p2pfs-desktop-token"),
        "version": st.sampled_from([1, 1.0, True]),
        "desktop": st.sampled_from(["alice", "", "-x"]),
        "secret": st.sampled_from(["73" * 32, "7", "zz"]),
        "server_cert_sha256": st.sampled_from(["ab" * 32, ""]),
        "appliance": st.sampled_from(["a:1", None]),
        "digest": st.sampled_from(["ab" * 32, "ab"]),
        "created": st.one_of(st.integers(), st.floats()),
    }
)

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(alphabet=string.printable, max_size=30),
    st.sampled_from(["20G", "1" + "0" * 400, "1.5T", "-1", "10.0.0.5:7420", "dhcp", "vsock:3:1"]),
)
toml_values = st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=4))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def render_toml(doc: dict[str, dict[str, Any]]) -> bytes:
    lines = []
    for table, body in doc.items():
        lines.append(f"[{json.dumps(table)}]")
        for k, v in body.items():
            if isinstance(v, dict):
                lines.append(
                    f"{json.dumps(k)} = {{ "
                    + ", ".join(f"{json.dumps(a)} = {toml_value(b)}" for a, b in v.items())
                    + " }"
                )
            else:
                lines.append(f"{json.dumps(k)} = {toml_value(v)}")
    return ("\n".join(lines) + "\n").encode()


CONFIG_TABLES = ["network", "fetch", "cache", "publish", "appliance", "other"]
CONFIG_KEYS = sorted(
    {
        k
        for rec in (
            config.NetworkSection,
            config.FetchSection,
            config.CacheSection,
            config.PublishSection,
            config.ApplianceSection,
        )
        for k in rec.__struct_fields__
    }
    | {"typo"}
)
config_docs = st.builds(
    render_toml,
    st.dictionaries(
        st.sampled_from(CONFIG_TABLES),
        st.dictionaries(st.sampled_from(CONFIG_KEYS), toml_values, max_size=6),
        max_size=5,
    ),
)
SEED_KEYS = [
    "format",
    "estate",
    "node",
    "volumes",
    "cache",
    "desktop_pin",
    "address",
    "port",
    "gateway",
    "peers",
    "discovery",
    "smb_password",
    "desktop_snapshots",
]
seed_docs = st.builds(
    render_toml,
    st.dictionaries(
        st.sampled_from(["seed", "host_only", "lan", "desktops", "x"]),
        st.dictionaries(
            st.sampled_from([*SEED_KEYS, "alice", "Bob"]),
            st.one_of(toml_values, st.dictionaries(st.sampled_from(SEED_KEYS), toml_values)),
            max_size=7,
        ),
        max_size=4,
    ),
)

# The estate backup: its header's fields (the seed's salt: another costs a scrypt), then
# any body; and contents with every field present, each valid or anything.
backup_files = st.builds(
    lambda header, nonce, body: header + nonce + body,
    st.sampled_from([SEALED_BACKUP[:33], b"P2PFS-BACKUP\x02" + SEALED_BACKUP[13:33]])
    | st.builds(
        lambda h: SEALED_BACKUP[:12] + h + SEALED_BACKUP[17:33], st.binary(min_size=5, max_size=5)
    ),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=200),
)
_CONTENTS: Any = codec.unpack(BACKUP_CONTENTS, max_size=1 << 24)
_VOLUME_ROW = _CONTENTS["volumes"][0]
backup_contents = st.builds(
    encode_msgpack,
    st.fixed_dictionaries(
        {k: st.one_of(st.just(v), st.just(v), values) for k, v in _CONTENTS.items()}
        | {
            "secrets": st.lists(
                st.lists(
                    st.one_of(ids(), st.lists(st.lists(ints | ids(), max_size=3), max_size=3))
                ),
                max_size=3,
            )
            | st.just(_CONTENTS["secrets"]),
            "files": st.dictionaries(
                st.sampled_from(["nodes.json", "grants.json", "groups.json", "x.json"]),
                json_of({"ab" * 16: st.text()}) | st.binary(max_size=20),
                max_size=3,
            ),
            "volumes": st.lists(
                st.tuples(*[st.one_of(st.just(f), values) for f in _VOLUME_ROW]).map(list),
                max_size=3,
            ),
        }
    ),
)

INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xc0",
    b"\xc1",
    b"\xc2",
    b"\xc4",
    b"\xc7",
    b"\xca",
    b"\xcb",
    b"\xcf",
    b"\xd3",
    b"\xd4",
    b"\xd9",
    b"\xdc",
    b"\xdd",
    b"\xde",
    b"\xdf",
    b"\x90",
    b"\xa0",
    b"\x91",
    b"\x81",
    b'"',
    b"[",
    b"{",
    b"=",
    b"\n",
    b"\\",
    b"9" * 40,
    b"-",
    b".",
]


NESTING = [b"[", b'{"a":', b"a={b=", b"a=[", b"\x91", b"\x81\xa1a", b"\xdc\x00\x01"]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid encoding, changed a few times: what a damaged or hostile copy looks like."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["flip", "flip", "cut", "insert", "delete", "set", "repeat"] * 2 + ["nest"]
            )
        )
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "set":
            new = draw(st.sampled_from(INTERESTING))
            data[pos : pos + len(new)] = new
        elif op == "repeat":
            # Long runs of one token: nesting ("[[[[", "\x91\x91") and huge numbers.
            unit = draw(st.sampled_from(INTERESTING))
            data[pos:pos] = unit * draw(st.sampled_from([2, 50, 400, 1100]))
        elif op == "nest":
            # Deep nesting in each syntax the targets read: the stack's limits.
            unit = draw(st.sampled_from(NESTING))
            data[pos:pos] = unit * draw(st.sampled_from([5, 40, 1100, 5000]))
    return bytes(data)


STRUCTURED: dict[str, st.SearchStrategy[bytes]] = {
    "frames": st.builds(b"".join, st.lists(frames(), min_size=1, max_size=3)),
    "desktop-frames": frames(),
    "messages": st.builds(encode_msgpack, headers) | raw_msgpack,
    "frame-messages": frames(),
    "unpack": any_msgpack | raw_msgpack,
    "blob": obj("blob", {"s": ints, "l": st.integers(-1, 9), "r": refs}),
    "tree": obj("tree", {"e": st.lists(entry, max_size=4)}),
    "snapshot": obj("snapshot", snapshot_fields),
    "id-list": obj(
        "ids", {"i": st.lists(ids(), max_size=3), "s": st.lists(ints, max_size=3), "n": ids()}
    ),
    "access": signed_outer,
    "access-body": st.builds(
        encode_msgpack, shaped(list_fields | {"vols": st.lists(access_row, max_size=3)})
    ),
    "revocations": signed_outer,
    "revocations-body": st.builds(
        encode_msgpack, shaped(list_fields | {"revoked": st.lists(ids(16), max_size=4)})
    ),
    "bundle": st.builds(
        encode_msgpack,
        shaped(
            {
                "format": st.just("p2pfs-join-bundle"),
                "v": st.just(1),
                "estate": ids(16),
                "ca": st.binary(max_size=300),
                "node": st.binary(max_size=300),
                "revocations": st.binary(max_size=100),
            }
        ),
    ),
    "backup": backup_files,
    "backup-contents": backup_contents,
    "request": st.builds(
        lambda b: (
            b"-----BEGIN CERTIFICATE REQUEST-----\n" + b + b"\n-----END CERTIFICATE REQUEST-----\n"
        ),
        st.binary(max_size=300),
    ),
    "cert": st.binary(max_size=600),
    "token": token_json,
    "token-record": token_json,
    "split-path": st.one_of(
        st.builds(
            lambda p: b"/".join(p),
            st.lists(
                st.sampled_from([b"a", b"", b".", b"..", b"\0", b".snapshots", b"x" * 300]),
                max_size=20,
            ),
        ),
        st.text().map(lambda s: s.encode("utf-8", "surrogatepass")),
    ),
    "address": st.builds(
        lambda parts: ":".join(parts).encode(),
        st.lists(
            st.sampled_from(["vsock", "tcp", "any", "3", "", "[::1]", "99999", "1" * 30, "x"]),
            max_size=5,
        ),
    ),
    "link-answer": json_of({}) | any_msgpack,
    "config": config_docs,
    "seed": seed_docs,
    "seed-bundle": st.builds(
        encode_msgpack, shaped({"format": st.just("p2pfs-join-bundle"), "v": st.just(1)})
    ),
    "summary": st.builds(
        encode_msgpack,
        shaped(
            {
                "name": st.sampled_from(["d1", "", "x" * 65, "a\nb"]),
                "site": st.none() | st.text(max_size=70),
                "ver": st.just("0.1.0"),
                "up": ints,
                "vols": st.lists(
                    st.lists(st.one_of(st.just("tools"), ints, st.just("ab" * 32), values)),
                    max_size=3,
                ),
                "cache": st.lists(ints | st.none(), max_size=3),
                "ready": st.booleans(),
                "from": st.lists(ints, max_size=4),
                "hist": st.lists(st.lists(ints, max_size=5), max_size=5),
                "probs": st.lists(st.text(max_size=10), max_size=3),
            }
        ),
    ),
    "http-head": st.builds(
        lambda line, headers: (line + "".join(headers) + "\r\n").encode("utf-8", "surrogatepass"),
        st.sampled_from(["GET / HTTP/1.1\r\n", "GET /?a=%ff&a=1 HTTP/1.0\n", "POST / x\r\n", ""])
        | st.text(max_size=40),
        st.lists(
            st.sampled_from(["Host: x\r\n", ":\r\n", " a: b\r\n", "\r\n"]) | st.text(max_size=20)
        ),
    ),
}


def strategy(name: str) -> st.SearchStrategy[bytes]:
    target = TARGETS[name]
    return st.one_of(
        st.binary(max_size=300),
        STRUCTURED[name],
        mutated(target.seeds),
        mutated(target.seeds),  # twice the weight: mutations reach the deep checks
    )


# -- the runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        f"  {name:18} {EXECUTIONS[name]:8} executions, {ACCEPTED[name]:7} accepted"
        for name in sorted(EXECUTIONS)
    ]
    lines.append(f"  {'total':18} {sum(EXECUTIONS.values()):8} executions, multiplier {MULTIPLIER}")
    if reporter is not None:
        reporter.write_line("\nfuzzing (t0_fuzz_test):")
        for line in lines:
            reporter.write_line(line)


def test_every_target_has_a_strategy_and_valid_seeds() -> None:
    assert set(STRUCTURED) == set(TARGETS)
    for name, target in TARGETS.items():
        assert target.seeds, name
        # At least one seed decodes: the mutations start from something valid.
        assert any(check(target, s) for s in target.seeds), name


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_returns_or_refuses_cleanly(name: str) -> None:
    target = TARGETS[name]
    before = EXECUTIONS[name]
    n = planned(name)

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy(name))
    def fuzz(data: bytes) -> None:
        check(target, data)

    fuzz()
    assert EXECUTIONS[name] - before >= n


# -- regressions: inputs the fuzzing found, each once a crash ----------------------------

REGRESSIONS: list[tuple[str, bytes]] = [
    # json.loads raised RecursionError (trust/desktop.py load_token, token_digest, desktops).
    ("token", b"[" * 5000),
    ("token-record", b"[" * 5000),
    # int(Infinity) raised OverflowError (ApplianceKeys.desktops: "created").
    ("token-record", b'{"desktop": "alice", "created": 1e400}'),
    # int(float("1000...0")) of a size string raised OverflowError (sizes.parse_size).
    ("config", b'[cache]\nmax_bytes = "1' + b"0" * 400 + b'"\n'),
    ("seed", SEED_TOML.replace(b'cache = "2G"', b'cache = "9' + b"9" * 400 + b'"')),
    # tomllib recursed once per nested array or inline table: RecursionError (config.decode).
    ("config", b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("config", b"a = " + b"{b=" * 3000 + b"}" * 3000 + b"\n"),
    ("seed", b"a = " + b"[" * 5000 + b"\n"),
    # "²".isdigit() is true but int("²") raises ValueError (net/link.py parse_address,
    # config.parse_peer for static_peers).
    ("address", "h:²".encode()),
    ("address", "vsock:3:²".encode()),
    ("config", '[network]\nstatic_peers = ["h:²"]\n'.encode()),
    # json.loads of an answer raised RecursionError (appliance/link_client.decode_result).
    ("link-answer", b"[" * 5000),
]


@pytest.mark.parametrize(("name", "data"), REGRESSIONS)
def test_regression_returns_or_refuses_cleanly(name: str, data: bytes) -> None:
    check(TARGETS[name], data)  # raises what the decoder raised, if not a P2pfsError


def test_a_non_p2pfs_error_is_a_failure() -> None:
    """The property has teeth: a decoder that raises anything else fails the check."""
    from fuzz_targets import Target

    def broken(data: bytes) -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        check(Target("broken", broken), b"")
    assert issubclass(UsageError, P2pfsError)
