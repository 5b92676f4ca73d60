"""Network facts about a client address: geo-IP (country, AS, hosting) and anonymizers.

:class:`NetworkSet` answers "is this address in any of these networks" with a binary
search over merged integer ranges, so a list of thousands of Tor exit addresses costs a
few comparisons per request. Anonymizer lists are read from ``networks.anonymizer_cidrs``
and ``networks.anonymizer_files`` (one address or CIDR per line, ``#`` comments: the
format of the Tor Project's exit list and of most published VPN range lists) and, when a
MaxMind Anonymous IP database is configured, from that database.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from distillguard.errors import ConfigError
from distillguard.geoip import GeoIP, NetworkInfo, canonical_ip, embedded_ipv4


class NetworkSet:
    def __init__(self, networks: Iterable[str]) -> None:
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for item in networks:
            net = ipaddress.ip_network(item.strip(), strict=False)
            ranges[net.version].append((int(net.network_address),
                                        int(net.broadcast_address)))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        self.size = 0
        for version, spans in ranges.items():
            merged: list[tuple[int, int]] = []
            for start, end in sorted(spans):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            self._starts[version] = [s for s, _ in merged]
            self._ends[version] = [e for _, e in merged]
            self.size += len(merged)

    def __contains__(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return self.contains(addr.version, int(addr))

    def contains(self, version: int, value: int) -> bool:
        """Membership of an address already parsed to (IP version, integer)."""
        starts = self._starts.get(version)
        if not starts:
            return False
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= self._ends[version][i]

    def __bool__(self) -> bool:
        return self.size > 0


def read_network_file(path: str) -> list[str]:
    """Addresses and CIDRs from a text file, one per line; ``#`` starts a comment. Lines
    of the Tor bulk exit list (``ExitAddress 1.2.3.4 ...``) are understood too."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"networks.anonymizer_files: cannot read {path}: "
                          f"{exc.strerror}") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("ExitAddress "):
            line = line.split()[1]
        elif " " in line:
            continue  # other Tor exit-list fields (ExitNode, Published, LastStatus)
        try:
            ipaddress.ip_network(line, strict=False)
        except ValueError:
            raise ConfigError(f"networks.anonymizer_files: {path} line {number}: "
                              f"{line!r} is not an IP address or network") from None
        out.append(line)
    if not out:
        # a list caught half-written (a cron download of the Tor exits) would switch the
        # anonymizer rules off without a word; the running policy is kept on a reload
        raise ConfigError(f"networks.anonymizer_files: {path} lists no address")
    return out


@dataclass(frozen=True, slots=True)
class ClientNetwork:
    info: NetworkInfo
    anonymizer: bool
    version: int = 0     # the address parsed once: IP version and integer value
    value: int = -1
    inner: int = -1      # the IPv4 a 6to4, Teredo or NAT64 address carries, as an integer

    def within(self, networks: NetworkSet) -> bool:
        """Whether the address, or the IPv4 address it carries, is in ``networks``."""
        return networks.contains(self.version, self.value) or (
            self.inner >= 0 and networks.contains(4, self.inner))


class NetworkFacts:
    """Everything the rules ask about a client address, from memory."""

    def __init__(self, geoip: Callable[[], GeoIP], anonymizers: NetworkSet) -> None:
        self._factory = geoip
        self._geoip: GeoIP | None = None
        self.anonymizers = anonymizers
        self._anon_db: Callable[[str], bool | None] | None = None
        self.lookup = lru_cache(maxsize=65_536)(self._lookup)  # type: ignore[method-assign]

    @property
    def geoip(self) -> GeoIP:
        """The database, opened on first use (the runtime opens it at start-up)."""
        if self._geoip is None:
            self._geoip = self._factory()
            self._anon_db = getattr(self._geoip.database, "anonymous", None)
        return self._geoip

    def lookup(self, ip: str | None) -> ClientNetwork:
        """Facts about ``ip``, cached (LRU, 65,536 addresses) for the life of the policy."""
        return self._lookup(ip)

    def _lookup(self, ip: str | None) -> ClientNetwork:
        if not ip:
            return ClientNetwork(NetworkInfo(ip=""), False)
        ip = canonical_ip(ip)       # ::ffff:a.b.c.d is an IPv4 client
        info = self.geoip.lookup(ip)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ClientNetwork(info, False)
        inner = embedded_ipv4(addr)
        client = ClientNetwork(info, False, addr.version, int(addr),
                               -1 if inner is None else int(inner))
        anonymous = client.within(self.anonymizers)
        if not anonymous and self._anon_db is not None and not info.private:
            anonymous = any(self._anon_db(str(a)) for a in (addr, inner) if a is not None)
        return replace(client, anonymizer=anonymous)
