"""Client addresses from real networks, checked against the geo-IP database.

Datacenter clients get addresses in networks of hosting operators (Hetzner, OVH,
DigitalOcean, AWS, Google Cloud, Azure, Linode/Akamai, Vultr, Contabo); residential
clients in consumer ISP networks (Comcast, AT&T, Deutsche Telekom, Vodafone, BT, Virgin
Media, Sky, Orange, Telefonica, Telecom Italia, Swisscom, Claro). Every /24 handed out
is looked up with :func:`distillguard.geoip.default_geoip` and kept only if detection's
look-up classifies it as intended (hosting or not, and the expected operator), so the
simulator and the detector agree on what a "datacenter IP" is.

Most /24s belong to one actor, but two kinds are shared by strangers, as on the real
Internet: a mobile carrier's NAT ranges (a few per country, behind which every phone of
the country appears) and a commercial VPN's exits (hosting ranges that many unrelated
consumers use). Residential proxy networks exit through the same carrier ranges.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from distillguard.geoip import GeoIP, NetworkInfo, default_geoip

# (network, AS-name fragment the look-up must return)
DATACENTER_NETWORKS: tuple[tuple[str, str], ...] = (
    ("5.9.0.0/16", "hetzner"), ("78.46.0.0/15", "hetzner"), ("88.198.0.0/16", "hetzner"),
    ("95.216.0.0/15", "hetzner"), ("51.68.0.0/16", "ovh"), ("137.74.0.0/16", "ovh"),
    ("145.239.0.0/16", "ovh"), ("104.131.0.0/16", "digitalocean"),
    ("159.65.0.0/16", "digitalocean"), ("167.99.0.0/16", "digitalocean"),
    ("3.80.0.0/12", "amazon"), ("54.144.0.0/12", "amazon"), ("35.184.0.0/13", "google"),
    ("13.64.0.0/11", "microsoft"), ("45.33.0.0/17", "akamai"), ("45.32.0.0/16", "choopa"),
    ("207.180.192.0/18", "contabo"), ("173.249.0.0/18", "contabo"),
)
# (network, country, ISP-name fragment)
RESIDENTIAL_NETWORKS: tuple[tuple[str, str, str], ...] = (
    ("73.0.0.0/8", "US", "comcast"), ("24.0.0.0/12", "US", "comcast"),
    ("98.192.0.0/10", "US", "comcast"), ("67.160.0.0/11", "US", "comcast"),
    ("99.0.0.0/10", "US", "att"), ("79.192.0.0/10", "DE", "telekom"),
    ("84.128.0.0/10", "DE", "telekom"), ("109.40.0.0/13", "DE", "vodafone"),
    ("86.128.0.0/10", "GB", "british telecom"), ("81.96.0.0/12", "GB", "virgin"),
    ("94.0.0.0/12", "GB", "sky"), ("90.0.0.0/9", "FR", "orange"), ("2.0.0.0/12", "FR", "orange"),
    ("83.32.0.0/11", "ES", "telefonica"), ("87.0.0.0/12", "IT", "telecom italia"),
    ("85.0.0.0/13", "CH", "bluewin"), ("189.0.0.0/11", "BR", ""),
)


@dataclass(frozen=True, slots=True)
class Block:
    """A /24 checked with the geo-IP look-up."""

    network: ipaddress.IPv4Network
    info: NetworkInfo

    def address(self, rng: random.Random) -> str:
        return str(self.network[1 + rng.randrange(254)])


# /24s of a mobile carrier's NAT per country, and of the VPN service's exits.
CARRIER_BLOCKS_PER_COUNTRY = 3
VPN_BLOCKS = 6


class NetworkAllocator:
    """Hands out checked /24 blocks; deterministic for a given random generator."""

    def __init__(self, rng: random.Random, geoip: GeoIP | None = None) -> None:
        self.rng = rng
        self.geoip = geoip or default_geoip()
        self._used: set[str] = set()
        self._carrier: dict[str, list[Block]] = {}
        self._vpn: list[Block] = []

    def _pick(self, network: str, want_hosting: bool, fragment: str) -> Block | None:
        net = ipaddress.IPv4Network(network)
        for _ in range(12):
            base = net.network_address + (self.rng.randrange(net.num_addresses) & ~0xFF)
            block = ipaddress.IPv4Network(f"{base}/24")
            if str(block) in self._used:
                continue
            info = self.geoip.lookup(str(block[1]))
            name = (info.asn_name or "").lower()
            if info.hosting != want_hosting or info.private or not info.asn_name:
                continue
            if fragment and fragment not in name.replace("-", " ").replace("&", ""):
                continue
            self._used.add(str(block))
            return Block(block, info)
        return None

    def datacenter(self) -> Block:
        """A /24 of a hosting operator."""
        for _ in range(50):
            network, fragment = self.rng.choice(DATACENTER_NETWORKS)
            block = self._pick(network, True, fragment)
            if block is not None:
                return block
        raise RuntimeError("no datacenter network passed the geo-IP check")

    def residential(self, country: str | None = None) -> Block:
        """A /24 of a consumer ISP (in ``country`` when one of the listed ISPs is there)."""
        candidates = [n for n in RESIDENTIAL_NETWORKS if country in (None, n[1])]
        candidates = candidates or list(RESIDENTIAL_NETWORKS)
        for _ in range(50):
            network, _, fragment = self.rng.choice(candidates)
            block = self._pick(network, False, fragment)
            if block is not None:
                return block
        raise RuntimeError("no residential network passed the geo-IP check")

    def carrier(self, country: str) -> list[Block]:
        """The carrier NAT /24s of ``country``, the same blocks for every caller."""
        if country not in self._carrier:
            self._carrier[country] = [self.residential(country)
                                      for _ in range(CARRIER_BLOCKS_PER_COUNTRY)]
        return self._carrier[country]

    def vpn(self) -> list[Block]:
        """The exits of the one commercial VPN service consumers use (hosting ranges)."""
        if not self._vpn:
            self._vpn = [self.datacenter() for _ in range(VPN_BLOCKS)]
        return self._vpn

    @staticmethod
    def countries() -> tuple[str, ...]:
        return tuple(sorted({c for _, c, _ in RESIDENTIAL_NETWORKS}))
