"""The estate view without a lab: summaries on the wire, the chart's sums, the page's
escaping, and who ``p2pfs web`` answers (over real sockets, with no daemon behind it)."""

from __future__ import annotations

import dataclasses
import http.client
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fuzz_targets import SUMMARY

from p2pfs.errors import UsageError
from p2pfs.node.estate_view import chart_series
from p2pfs.node.summary import BadSummary, NodeSummary, VolumeSummary
from p2pfs.node.web import WebView
from p2pfs.node.web_page import render
from p2pfs.objects import codec

pytestmark = pytest.mark.unit
TOKEN = "0123456789abcdef0123456789abcdef"


def test_a_summary_survives_the_wire_and_a_bad_one_is_refused() -> None:
    s = NodeSummary.from_wire(SUMMARY)
    assert s.to_wire() == SUMMARY
    assert s.volumes == (VolumeSummary("tools", 3, "ab" * 32, "public"),)
    doc = codec.unpack(SUMMARY, max_size=1 << 20)
    assert isinstance(doc, dict)
    for field, bad in [
        ("name", "a\nb"),  # not printable: it would break the page's lines
        ("name", "x" * 65),
        ("vols", [["tools", 3, "zz" * 32, "public"]]),
        ("vols", [["tools", 3, None, "owner"]]),
        ("vols", [["tools", 3, None, "public"]] * 257),
        ("from", [1, 2]),
        ("up", -1),
        ("ready", 1),
        ("hist", [[1, 2, 3]]),
    ]:
        with pytest.raises(BadSummary):
            NodeSummary.from_wire(codec.pack({**doc, field: bad}))
    with pytest.raises(BadSummary, match="limit"):
        NodeSummary.from_wire(b"\x00" * (64 * 1024 + 1))


def test_the_chart_sums_every_node_per_minute_and_survives_a_restart() -> None:
    one = [[60, 0, 0, 0], [120, 10, 20, 30], [180, 10, 25, 30]]
    two = [[90, 5, 0, 0], [150, 6, 0, 100], [170, 1, 0, 0]]  # restarted: totals fell
    got = {p["t"]: p for p in chart_series([one, two], 60)}
    assert got[120] == {"t": 120, "local": 10 + 1 + 1, "peers": 20, "origin": 30 + 100}
    assert got[180] == {"t": 180, "local": 0, "peers": 5, "origin": 0}


def _view(name: str) -> dict[str, object]:
    s = dataclasses.replace(NodeSummary.from_wire(SUMMARY), name=name)
    return {
        "estate": "ab" * 16,
        "node_id": "cd" * 16,
        "generated_at": 1_700_000_100,
        "nodes": [
            {
                "node_id": "ef" * 16,
                "state": "connected",
                "heard_s_ago": 3,
                "name": s.name,
                "site": s.site,
                "version": s.version,
                "volumes": [{"name": "tools", "seq": 3, "snapshot": "ab" * 32, "access": "public"}],
                "cache_bytes": 1 << 20,
                "cache_quota": 4 << 20,
                "offline_ready": False,
                "pins": 1,
                "corrupt_chunks_rejected": 2,
                "quarantined_peers": 1,
                "problems": ["<b>tools</b>: cannot read"],
                "bytes_from": {"local": 1, "peers": 2, "origin": 3},
                "bytes_served": 4,
                "history": [],
            },
            {"node_id": "01" * 16, "state": "not connected", "heard_s_ago": None, "history": []},
        ],
        "chart": [{"t": 1_700_000_040, "local": 1, "peers": 2, "origin": 3}],
    }


def test_the_page_escapes_what_peers_say() -> None:
    page = render(_view('<script>alert("x")</script>'))
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;tools&lt;/b&gt;: cannot read" in page
    assert "2 corrupt chunks rejected" in page and "25 %" in page
    assert "no summary heard from this node" in page
    assert page.count("<rect") == 3  # one bar, three sources


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()


def _ask(view: WebView, requests: list[tuple[str, dict[str, str]]]) -> list[tuple]:
    out: list[tuple] = []

    async def main() -> None:
        await view.http.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(view.http.run)
            for path, headers in requests:
                out.append(await trio.to_thread.run_sync(_get, view.http.port, path, headers))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return out


def test_without_a_token_only_loopback_is_answered(tmp_path: Path) -> None:
    view = WebView(tmp_path / "control.sock", ("127.0.0.1", 0))
    many = "/?" + "&".join(f"a{i}=1" for i in range(40))
    (ok, _, body), (rebound, _, _), (missing, _, _), (bad, _, _), (again, _, _) = _ask(
        view,
        [
            ("/", {"Host": "127.0.0.1:9743"}),
            ("/", {"Host": "attacker.example:9743"}),  # DNS rebinding
            ("/elsewhere", {"Host": "localhost"}),
            (many, {"Host": "localhost"}),  # a bad request, answered: the server stays
            ("/", {"Host": "localhost"}),
        ],
    )
    assert ok == 503 and "no p2pfs daemon is running" in body  # no daemon behind it: said, retried
    assert rebound == 403 and missing == 404 and bad == 400 and again == 503
    with pytest.raises(UsageError, match="--token-file"):
        WebView(tmp_path / "control.sock", ("0.0.0.0", 0))


def test_with_a_token_the_browser_presents_it_once(tmp_path: Path) -> None:
    view = WebView(tmp_path / "control.sock", ("127.0.0.1", 0), token=TOKEN)
    answers = _ask(
        view,
        [
            ("/", {"Host": "anything"}),
            ("/?token=wrong", {}),
            (f"//elsewhere.example/?token={TOKEN}", {}),
            ("/", {"Cookie": f"p2pfs_token={TOKEN}"}),
            ("/estate.json", {"Authorization": f"Bearer {TOKEN}"}),
        ],
    )
    (none, _, _), (wrong, _, _), (given, headers, _), (cookie, _, _), (bearer, _, _) = answers
    assert none == wrong == 403
    assert given == 303 and headers["Set-Cookie"].startswith(f"p2pfs_token={TOKEN}; HttpOnly")
    assert headers["Location"] == "/"  # never to another host
    assert cookie == bearer == 503  # let in; the daemon is what is missing


def test_a_short_token_file_is_refused_by_name(tmp_path: Path) -> None:
    token = tmp_path / "web.token"
    token.write_text("short\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pfs",
            "--home",
            str(tmp_path / "home"),
            "web",
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            str(token),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and f"{token}: the web token must be" in proc.stderr
