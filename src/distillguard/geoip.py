"""Where a client IP comes from: country, network (AS name and prefix) and whether it is a
hosting / datacenter network, from an offline database.

The default database is the one shipped inside the ``geoip2fast`` package (country and AS
data derived from public registry and GeoLite-style sources, IPv4 and IPv6); nothing is
fetched at run time. Other databases plug in behind :class:`GeoIPDatabase`; MaxMind's
commercial GeoIP2 or free GeoLite2 ``.mmdb`` files through :class:`MaxMindDatabase`.

Hosting networks are recognised by the AS name (a curated list of cloud, VPS and
dedicated-server operators, :data:`HOSTING_AS_KEYWORDS`) and by operator-supplied CIDR
lists. The list is a heuristic: a hosting provider missing from it is reported as not
hosting, so rules built on it should be read as "known hosting network".

Usage::

    from distillguard.geoip import default_geoip
    info = default_geoip().lookup("5.9.1.1")
    info.country, info.asn_name, info.hosting      # 'DE', 'Hetzner Online GmbH', True
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

# Lower-case fragments of AS names of cloud, VPS, dedicated-server and CDN operators.
HOSTING_AS_KEYWORDS: tuple[str, ...] = (
    "amazon", "aws", "google", "microsoft", "azure", "digitalocean", "linode", "akamai",
    "hetzner", "ovh", "vultr", "choopa", "contabo", "scaleway", "online s.a.s", "leaseweb",
    "alibaba", "aliyun", "tencent", "huawei cloud", "oracle", "ibm", "softlayer",
    "cloudflare", "fastly", "rackspace", "hostinger", "hosting", "datacenter",
    "data center", "colocation", "server", "cloud", "vps", "m247", "packet host",
    "equinix", "upcloud", "kamatera", "ionos", "1&1", "godaddy", "hostwinds", "psychz",
    "quadranet", "colocrossing", "servers.com", "g-core", "gcore", "selectel",
    "timeweb", "netcup", "strato", "zenlayer", "cogent", "datacamp", "worldstream",
    "tzulo", "sharktech", "frantech", "buyvm", "host europe", "dreamhost", "bluehost",
)


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """What the database says of one IP address."""

    ip: str
    country: str | None = None      # ISO 3166-1 alpha-2, None when unknown
    asn_name: str | None = None     # AS (organisation) name, None when unknown
    asn_network: str | None = None  # the AS's announced prefix containing the IP
    prefix: str | None = None       # the IP's /24 (IPv4) or /48 (IPv6)
    hosting: bool = False           # a known hosting / datacenter network
    private: bool = False           # loopback, private or reserved range

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "country": self.country, "asn_name": self.asn_name,
                "asn_network": self.asn_network, "prefix": self.prefix,
                "hosting": self.hosting, "private": self.private}


class GeoIPDatabase(Protocol):
    """A source of country and AS data. ``country`` and ``asn`` return None when unknown."""

    def country(self, ip: str) -> str | None: ...

    def asn(self, ip: str) -> tuple[str | None, str | None]:
        """(AS name, announced prefix)."""
        ...


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical_address(ip: str) -> Address | None:
    """``ip`` parsed, an IPv4 address mapped into IPv6 (``::ffff:203.0.113.7``, what a
    dual-stack socket or some proxies report) as the IPv4 address; None for text that is
    no address. Looked up as written, a mapped address had no country (an embargo rule
    never matched it) and every such client shared the prefix ``::/48``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(addr: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition address carries, where the client is: 6to4
    (``2002:AABB:CCDD::/48``, RFC 3056: the site's IPv4), Teredo (``2001::/32``, RFC 4380:
    the client's public IPv4, stored inverted) and NAT64's well-known prefix
    (``64:ff9b::/96``, RFC 6052: the IPv4 client an SIIT or NAT46 translator put there);
    None for any other address. The geo-IP databases do not place these prefixes, so
    looked up as written a client from an embargoed country had no country (6to4,
    NAT64) or was taken for a private address (Teredo) and judged by its declared country
    alone."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFF_FFFF)
    return None


def canonical_ip(ip: str) -> str:
    """``ip`` as one address is always written (:func:`canonical_address`, in its
    compressed lower-case form); text that is no address as given."""
    addr = canonical_address(ip)
    return ip if addr is None else str(addr)


def _prefix(addr: Address) -> str:
    bits = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def client_prefix(ip: str) -> str | None:
    """The /24 of an IPv4 address or the /48 of an IPv6 address, as a network string."""
    addr = canonical_address(ip)
    return None if addr is None else _prefix(addr)


class Geoip2FastDatabase:
    """The country and ASN files shipped inside the ``geoip2fast`` package: the IPv4 file
    for IPv4 addresses and, loaded at the first IPv6 address, the file that covers IPv6.
    Only the IPv4 file was read, so every IPv6 client had no country and jurisdiction
    rules on client addresses let it through. The IPv6 file also names the AS of more
    IPv4 addresses, but IPv4 keeps its own file: hosting and network features, and the
    simulator's choice of addresses, stay what detection was calibrated on."""

    def __init__(self) -> None:
        import geoip2fast

        self._folder = os.path.dirname(str(geoip2fast.__file__))
        # The ASN files carry countries as well; one reader serves both questions.
        self._v4 = self._open("geoip2fast-asn.dat.gz")
        self._v6: Any = None
        self._lock = threading.Lock()

    def _open(self, name: str) -> Any:
        from geoip2fast import GeoIP2Fast

        return GeoIP2Fast(geoip2fast_data_file=os.path.join(self._folder, name),
                          verbose=False)

    def _lookup(self, ip: str) -> Any:
        with self._lock:
            if ":" not in ip:
                return self._v4.lookup(ip)
            if self._v6 is None:
                self._v6 = self._open("geoip2fast-asn-ipv6.dat.gz")
            return self._v6.lookup(ip)

    def country(self, ip: str) -> str | None:
        code = getattr(self._lookup(ip), "country_code", "") or ""
        return code if len(code) == 2 and code.isalpha() else None

    def asn(self, ip: str) -> tuple[str | None, str | None]:
        result = self._lookup(ip)
        return (getattr(result, "asn_name", "") or None, getattr(result, "asn_cidr", "") or None)


class MaxMindDatabase:
    """MaxMind database files (GeoIP2 / GeoLite2, ``.mmdb``) through the ``geoip2`` reader.

    ``country_path`` is a Country, City or Enterprise database; ``asn_path`` an ASN (or ISP)
    database; ``anonymous_path`` an Anonymous IP database. Each is optional; a question no
    file answers (no file, or an address the file does not cover) goes to ``fallback``
    (for example :class:`Geoip2FastDatabase`) or is unknown. Files are memory-mapped by ``maxminddb`` when its C extension is available,
    so look-ups do no file I/O after the first touch of a page. Plug one in with::

        GeoIP(MaxMindDatabase("/var/lib/GeoIP/GeoIP2-Country.mmdb",
                              asn_path="/var/lib/GeoIP/GeoLite2-ASN.mmdb",
                              fallback=Geoip2FastDatabase()))

    or, for the policy component, ``networks.maxmind_*_db`` in the policy file.
    """

    def __init__(self, country_path: str | None = None, *, asn_path: str | None = None,
                 anonymous_path: str | None = None,
                 fallback: GeoIPDatabase | None = None) -> None:
        import geoip2.database

        self._country = geoip2.database.Reader(country_path) if country_path else None
        self._asn = geoip2.database.Reader(asn_path) if asn_path else None
        self._anonymous = geoip2.database.Reader(anonymous_path) if anonymous_path else None
        self.fallback = fallback

    def country(self, ip: str) -> str | None:
        if self._country is None:
            return self.fallback.country(ip) if self.fallback is not None else None
        import geoip2.errors

        try:
            code = self._country.country(ip).country.iso_code
        except ValueError:
            return None
        except geoip2.errors.AddressNotFoundError:
            code = None
        if not code:
            return self.fallback.country(ip) if self.fallback is not None else None
        return code.upper()

    def asn(self, ip: str) -> tuple[str | None, str | None]:
        if self._asn is None:
            return self.fallback.asn(ip) if self.fallback is not None else (None, None)
        import geoip2.errors

        try:
            found = self._asn.asn(ip)
        except ValueError:
            return None, None
        except geoip2.errors.AddressNotFoundError:
            return self.fallback.asn(ip) if self.fallback is not None else (None, None)
        network = str(found.network) if found.network is not None else None
        return found.autonomous_system_organization or None, network

    def anonymous(self, ip: str) -> bool | None:
        """True for a VPN, hosting proxy, public proxy, residential proxy or Tor exit in
        the Anonymous IP database; None without that database."""
        if self._anonymous is None:
            return None
        import geoip2.errors

        try:
            return bool(self._anonymous.anonymous_ip(ip).is_anonymous)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return False

    def close(self) -> None:
        for reader in (self._country, self._asn, self._anonymous):
            if reader is not None:
                reader.close()


class GeoIP:
    """Looks up :class:`NetworkInfo` with an LRU cache; safe to share between threads."""

    def __init__(self, database: GeoIPDatabase | None = None, *,
                 hosting_networks: Iterable[str] = (),
                 hosting_keywords: Iterable[str] = HOSTING_AS_KEYWORDS,
                 cache_size: int = 65_536) -> None:
        self.database = database if database is not None else Geoip2FastDatabase()
        self.hosting_networks = [ipaddress.ip_network(n, strict=False)
                                 for n in hosting_networks]
        self.hosting_keywords = tuple(k.lower() for k in hosting_keywords)
        self.lookup = lru_cache(maxsize=cache_size)(self._lookup)  # type: ignore[method-assign]

    def is_hosting_name(self, asn_name: str | None) -> bool:
        if not asn_name:
            return False
        name = asn_name.lower()
        return any(k in name for k in self.hosting_keywords)

    def _lookup(self, ip: str) -> NetworkInfo:
        addr = canonical_address(ip)
        if addr is None:
            return NetworkInfo(ip=ip)
        ip = str(addr)
        place = embedded_ipv4(addr) or addr     # where a transition address's client is
        if not place.is_global:
            return NetworkInfo(ip=ip, prefix=_prefix(addr), private=True)
        asn_name, asn_network = self.database.asn(str(place))
        hosting = self.is_hosting_name(asn_name) or any(
            place in net for net in self.hosting_networks if net.version == place.version)
        return NetworkInfo(ip=ip, country=self.database.country(str(place)),
                           asn_name=asn_name, asn_network=asn_network, prefix=_prefix(addr),
                           hosting=hosting)


_default: GeoIP | None = None
_default_lock = threading.Lock()


def default_geoip() -> GeoIP:
    """The process-wide GeoIP on the shipped database (loaded once, about a second)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = GeoIP()
    return _default
