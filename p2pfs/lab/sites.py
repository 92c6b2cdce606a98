"""Several sites joined by a router, and a cloud for servers: an estate beyond one LAN.

Layout (see docs/lab.md)::

    <prefix><id>-wan  (the router)
      up0 10.213.A.254 ══ wan ─ br0 of <prefix><id>-sw0 ── hosts of site a (10.213.A.1, .2, ...)
      up1 10.213.B.254 ══ wan ─ br0 of <prefix><id>-sw1 ── hosts of site b
      ...
      upN 10.213.C.254 ══ wan ─ br0 of <prefix><id>-swN ── the servers ("cloud": S3, nginx)

Each site is a :class:`~p2pfs.lab.netns.Lab`-style switch of its own (a bridge in a
namespace, every host cabled to it); the router namespace holds the other end of each
site's uplink, with the site's gateway address, and forwards unicast between sites and
the cloud. It runs no multicast routing, so mDNS stays inside its site. Hosts have a
route to every subnet of the lab through their site's gateway and no default route:
nothing leaves the lab. An uplink is shaped at both ends (``tbf``, or ``netem`` with a
delay), so a site's traffic to the others and the cloud is slower than inside it.

Everything is recorded and removed as for ``Lab``: the same state file, processes,
mounts, ``cleanup_stale``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from .netns import MAX_HOSTS, Host, Lab, plug_host
from .plumbing import (
    LabError,
    ip_cmd,
    link_bytes,
    new_netns,
    new_switch,
    shape_ends,
    unshape_ends,
    write_sysctl,
)

log = logging.getLogger(__name__)

CLOUD = "cloud"  # the segment of the server hosts
GATEWAY = 254  # the router's address on every segment: 10.213.k.254
MAX_SEGMENT_HOSTS = 250  # 10.213.k.1 .. .250


class SiteHost(Host):
    """A host of one site (or of the cloud): its cable goes to that site's switch."""

    def __init__(self, lab: SitesLab, index: int, name: str, site: str, number: int) -> None:
        super().__init__(lab, index, name)
        k = lab.subnet_index_of(site)
        self.site = site
        self.switch_netns = lab.switch_netns_of(site)
        self.address = f"10.213.{k}.{number}"
        self.gateway = f"10.213.{k}.{GATEWAY}"

    def __repr__(self) -> str:
        return f"SiteHost({self.name!r}, site {self.site!r}, {self.netns}, {self.address})"


class SitesLab(Lab):
    """Sites of desktops (``sites={"a": 2, "b": 2}``) and server hosts in a cloud.

    Hosts of site ``a`` are named ``a1``, ``a2``, ...; servers ``server0``, ... (or
    ``servers=["s3", "web"]``). ``uplink_mbit`` shapes every site's uplink from the
    start (each way); ``shape_uplink`` changes one. Root only; a context manager like
    ``Lab``.
    """

    def __init__(
        self,
        sites: Mapping[str, int],
        *,
        servers: int | Sequence[str] = 1,
        uplink_mbit: float | None = None,
        uplink_delay_ms: float = 0,
        prefix: str = "p2l",
    ) -> None:
        if not sites:
            raise LabError("a SitesLab has at least one site")
        server_names = (
            [f"server{i}" for i in range(servers)] if isinstance(servers, int) else list(servers)
        )
        for site, count in sites.items():
            if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", site) or site == CLOUD:
                raise LabError(f"site name {site!r}: 1-16 lowercase letters or digits, not {CLOUD}")
            if not 0 <= count <= MAX_SEGMENT_HOSTS:
                raise LabError(f"a site has 0 to {MAX_SEGMENT_HOSTS} hosts, not {count}")
        if len(server_names) > MAX_SEGMENT_HOSTS:
            raise LabError(f"at most {MAX_SEGMENT_HOSTS} servers")
        if uplink_mbit is not None and uplink_mbit <= 0:
            raise LabError(f"bad uplink rate {uplink_mbit} Mbit/s")
        layout = [(s, f"{s}{i}") for s, count in sites.items() for i in range(1, count + 1)]
        layout += [(CLOUD, name) for name in server_names]
        names = [name for _, name in layout]
        if len(names) > MAX_HOSTS:
            raise LabError(f"a lab has at most {MAX_HOSTS} hosts")
        super().__init__(names=names, prefix=prefix)
        self.segments = [*sites, CLOUD]  # sites in order, the cloud last
        self._layout = layout
        self._subnet_count = len(self.segments)
        self._uplink = (uplink_mbit, uplink_delay_ms)
        self.hosts_of: dict[str, list[SiteHost]] = {s: [] for s in self.segments}

    # -- names and addresses

    @property
    def router_netns(self) -> str:
        return f"{self.prefix}{self.id}-wan"

    def _segment(self, site: str) -> int:
        try:
            return self.segments.index(site)
        except ValueError:
            raise LabError(f"no site {site!r} (sites: {', '.join(self.segments)})") from None

    def switch_netns_of(self, site: str) -> str:
        return f"{self.prefix}{self.id}-sw{self._segment(site)}"

    def subnet_index_of(self, site: str) -> int:
        return self.subnet_indexes[self._segment(site)]

    def subnet_of(self, site: str) -> str:
        """``10.213.k.0/24``: the site's (or the cloud's) subnet."""
        return f"10.213.{self.subnet_index_of(site)}.0/24"

    def site(self, name: str) -> list[SiteHost]:
        """The hosts of one site, in order (``a1``, ``a2``, ...)."""
        self._segment(name)
        return list(self.hosts_of[name])

    @property
    def sites(self) -> list[str]:
        return self.segments[:-1]

    @property
    def servers(self) -> list[SiteHost]:
        return list(self.hosts_of[CLOUD])

    def server(self, i: int = 0) -> SiteHost:
        return self.hosts_of[CLOUD][i]

    # -- uplinks

    def uplink_ends(self, site: str) -> list[tuple[str, str]]:
        """(namespace, device) of the uplink's two ends: the router's side (its egress is
        what goes into the site) and the site switch's side (what leaves the site)."""
        j = self._segment(site)
        return [(self.router_netns, f"up{j}"), (self.switch_netns_of(site), "wan")]

    def shape_uplink(self, site: str, rate_mbit: float, delay_ms: float = 0) -> None:
        """Limit the site's link to the router to ``rate_mbit`` each way (+ ``delay_ms``)."""
        shape_ends(self.uplink_ends(site), rate_mbit, delay_ms)

    def unshape_uplink(self, site: str) -> None:
        unshape_ends(self.uplink_ends(site))

    def uplink_down(self, site: str) -> None:
        """Cut the site off: its hosts still reach each other, no one else."""
        ip_cmd("link", "set", "wan", "down", netns=self.switch_netns_of(site))

    def uplink_up(self, site: str) -> None:
        ip_cmd("link", "set", "wan", "up", netns=self.switch_netns_of(site))

    def uplink_bytes(self, site: str) -> tuple[int, int]:
        """(into the site, out of the site): bytes through its uplink so far."""
        rx, tx = link_bytes(self.router_netns, f"up{self._segment(site)}")
        return tx, rx

    # -- hosts

    def add_host(self, name: str | None = None, site: str | None = None) -> SiteHost:
        """A host that joins ``site`` (or the cloud) later; named ``<site><n>`` by default."""
        if not self._started or self._closed:
            raise LabError("add_host on a lab that is not running")
        if site is None:
            raise LabError("SitesLab.add_host needs a site (or site='cloud' for a server)")
        self._segment(site)
        if name is None:
            name = f"{site}{len(self.hosts_of[site]) + 1}"
        return self._add_to(site, name)

    def _add(self, name: str | None) -> Host:
        raise LabError("a SitesLab host needs a site: add_host(name, site=...)")

    def _add_to(self, site: str, name: str) -> SiteHost:
        number = len(self.hosts_of[site]) + 1
        if number > MAX_SEGMENT_HOSTS:
            raise LabError(f"site {site!r} has {MAX_SEGMENT_HOSTS} hosts already")
        index, name = self._new_host_slot(name)
        host = SiteHost(self, index, name, site, number)
        self.hosts.append(host)
        self.hosts_of[site].append(host)
        self._save()  # recorded before it exists, so a crash leaves nothing unrecorded
        others = [(self.subnet_of(s), host.gateway) for s in self.segments if s != site]
        plug_host(host, others)
        return host

    def _build(self) -> None:
        router = self.router_netns
        new_netns(router)
        write_sysctl(router, "net/ipv4/ip_forward", "1")
        for j, site in enumerate(self.segments):
            sw = self.switch_netns_of(site)
            new_switch(sw)
            # Born in their namespaces, like a host's cable: nothing appears in ours.
            ip_cmd(
                "link",
                "add",
                "wan",
                "type",
                "veth",
                "peer",
                "name",
                f"up{j}",
                "netns",
                router,
                netns=sw,
            )
            ip_cmd("link", "set", "wan", "master", "br0", netns=sw)
            ip_cmd("link", "set", "wan", "up", netns=sw)
            gateway = f"10.213.{self.subnet_index_of(site)}.{GATEWAY}/24"
            ip_cmd("addr", "add", gateway, "dev", f"up{j}", netns=router)
            ip_cmd("link", "set", f"up{j}", "up", netns=router)
        for site, name in self._layout:
            self._add_to(site, name)
        rate, delay = self._uplink
        if rate is not None:
            for site in self.sites:
                self.shape_uplink(site, rate, delay)
        log.info(
            "sites lab %s%s: %s",
            self.prefix,
            self.id,
            ", ".join(f"{s} {self.subnet_of(s)} x{len(self.hosts_of[s])}" for s in self.segments),
        )
