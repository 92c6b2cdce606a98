"""An estate over several sites with an S3 origin: the publisher in the cloud, desktops
in sites joined by shaped uplinks, moto's S3 server beside the publisher.

Used by ``tests/t22_sites_lab_test.py`` and ``benchmarks/bench_origins.py``. The
publisher uploads the volume to the bucket, every desktop follows it (mDNS within its
site, ``static_peers`` across sites), then the publisher stops: from then on a desktop's
bytes come from peers or the origin, and the S3 host's transmitted bytes are the
origin's copies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .estate import EstateLab, Node, wait_for
from .servers import S3Server, start_s3
from .sites import CLOUD, SitesLab

BUCKET = "estate-tools"


@dataclass
class OriginEstate:
    lab: SitesLab
    estate: EstateLab
    s3: S3Server
    desktops: dict[str, list[Node]]  # by site

    @property
    def publisher(self) -> Node:
        return self.estate.admin

    def cli(self, node: Node, *args: str) -> str:
        """A p2pfs command in the node's own host (it reaches the lab's S3 server)."""
        argv = [sys.executable, "-m", "p2pfs", "--home", str(node.home), *args]
        proc = node.host.run(argv, capture_output=True, text=True, timeout=600, env=self.s3.env())
        if proc.returncode != 0:
            raise AssertionError(f"p2pfs {' '.join(args)} failed: {proc.stderr.strip()}")
        return str(proc.stdout)

    def origin_sent(self) -> int:
        """Bytes the S3 server's host has sent so far."""
        return self.lab.server(0).link_bytes()[1]


def _follows(node: Node, seq: int) -> bool:
    vols = node.status()["volumes"]
    return bool(vols) and int(vols[0]["seq"]) == seq


@contextlib.contextmanager
def origin_estate(
    work: Path,
    tree: Path,
    sites: Mapping[str, int],
    *,
    uplink_mbit: float = 100,
    peer_fetch: bool = True,
    deadline_s: float = 5.0,
    poll_s: float = 60.0,
) -> Iterator[OriginEstate]:
    """The estate, the volume ``tools`` of ``tree`` at the S3 origin, every desktop
    mounted and following it, the publisher stopped."""
    lab = SitesLab(sites, servers=["s3", "pub"], uplink_mbit=uplink_mbit)
    with lab:
        s3 = start_s3(lab.server(0), workdir=work / "moto")
        s3.create_bucket(BUCKET)
        estate = EstateLab(lab, work)
        try:
            pub = estate.add_node("pub", lab.server(1))
            desktops = {
                site: [estate.add_node(h.name, h) for h in lab.site(site)] for site in lab.sites
            }
            every = [n for nodes in desktops.values() for n in nodes]
            for site, nodes in desktops.items():
                others = [f"{n.address}:7420" for n in every if n not in nodes]
                for node in nodes:
                    node.configure(
                        {
                            "static_peers": [f"{pub.address}:7420", *others],
                            "peer_fetch": peer_fetch,
                        },
                        site=site,
                        deadline_s=deadline_s,
                        origin_poll_s=poll_s,
                    )
            pub.configure({"static_peers": [f"{n.address}:7420" for n in every]}, site=CLOUD)
            world = OriginEstate(lab, estate, s3, desktops)
            estate.publish(tree)
            world.cli(
                pub, "origin", "add", "tools", f"s3://{BUCKET}/tools", "--endpoint", s3.endpoint
            )
            json.loads(world.cli(pub, "origin", "sync", "tools", "--json"))
            seq = _seq_offline(world)
            env = s3.env()
            pub.launch(env=env)
            for node in every:
                node.launch(env=env)
            for node in [pub, *every]:
                node.wait_mounted()
            for node in every:
                wait_for(
                    f"{node.name} to follow the volume", functools.partial(_follows, node, seq), 90
                )
            pub.stop()
            yield world
        finally:
            estate.stop_all()


def _seq_offline(world: OriginEstate) -> int:
    rows = json.loads(world.cli(world.publisher, "origin", "list", "--json"))
    return int(rows[0]["seq"])
