from __future__ import annotations

from distillguard.gateway.clientip import ClientIPResolver
from distillguard.geoip import GeoIP, NetworkInfo, canonical_ip, client_prefix, default_geoip


class FixedDatabase:
    def __init__(self, asn_name: str | None, country: str | None = "FR") -> None:
        self.asn_name = asn_name
        self.country_code = country

    def country(self, ip: str) -> str | None:
        return self.country_code

    def asn(self, ip: str) -> tuple[str | None, str | None]:
        return self.asn_name, "192.0.0.0/8" if self.asn_name else None


def test_shipped_database_knows_hosting_and_residential_networks() -> None:
    geo = default_geoip()
    hetzner = geo.lookup("5.9.1.1")
    assert (hetzner.country, hetzner.hosting, hetzner.prefix) == ("DE", True, "5.9.1.0/24")
    assert "hetzner" in (hetzner.asn_name or "").lower()
    isp = geo.lookup("81.2.69.160")
    assert isp.country == "GB" and isp.hosting is False and isp.asn_name


def test_private_and_malformed_addresses() -> None:
    geo = GeoIP(FixedDatabase("OVH SAS"))
    assert geo.lookup("10.1.2.3") == NetworkInfo(ip="10.1.2.3", prefix="10.1.2.0/24",
                                                 private=True)
    assert geo.lookup("not-an-ip") == NetworkInfo(ip="not-an-ip")


def test_hosting_from_as_name_and_from_operator_networks() -> None:
    assert GeoIP(FixedDatabase("OVH SAS")).lookup("51.1.2.3").hosting
    plain = GeoIP(FixedDatabase("Deutsche Telekom AG"))
    assert not plain.lookup("51.1.2.3").hosting
    listed = GeoIP(FixedDatabase("Deutsche Telekom AG"), hosting_networks=["51.1.0.0/16"])
    assert listed.lookup("51.1.2.3").hosting and not listed.lookup("52.1.2.3").hosting


def test_client_prefix() -> None:
    assert client_prefix("203.0.113.77") == "203.0.113.0/24"
    assert client_prefix("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert client_prefix("x") is None


def test_an_ipv4_address_mapped_into_ipv6_is_the_ipv4_address() -> None:
    """A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d: looked up as
    written it had no country, and every such client shared the prefix ::/48."""
    assert canonical_ip("::ffff:175.45.176.1") == "175.45.176.1"
    assert canonical_ip("::FFFF:AF2D:B001") == "175.45.176.1"
    assert canonical_ip("2001:DB8::0001") == "2001:db8::1"
    assert canonical_ip("not an address") == "not an address"
    info = default_geoip().lookup("::ffff:175.45.176.1")
    assert (info.ip, info.country, info.prefix) == ("175.45.176.1", "KP", "175.45.176.0/24")
    assert client_prefix("::ffff:198.51.100.9") == "198.51.100.0/24"
    # the peer of a dual-stack socket is a trusted IPv4 proxy; its X-Forwarded-For counts
    resolver = ClientIPResolver(["127.0.0.0/8"])
    assert resolver.resolve("::ffff:127.0.0.1", "::ffff:175.45.176.1") == "175.45.176.1"
    assert ClientIPResolver([]).resolve("::ffff:203.0.113.7", "1.2.3.4") == "203.0.113.7"


def test_ipv6_clients_have_a_country_and_a_network() -> None:
    """The shipped reader loaded the IPv4-only file: every IPv6 client had no country,
    so jurisdiction rules on client addresses let it through."""
    geo = default_geoip()
    assert geo.lookup("2a01:5ec0::1").country == "IR"
    yandex = geo.lookup("2a02:6b8::1")
    assert yandex.country == "RU" and "yandex" in (yandex.asn_name or "").lower()
    assert geo.lookup("5.160.0.1").country == "IR"          # IPv4 as before


def test_forwarded_hops_on_several_lines_with_ports_or_unknown() -> None:
    """Only the first X-Forwarded-For line was read: behind a proxy that adds a line of
    its own, the client's own line (any address it liked) decided. A hop with a port, or
    one that is no address, fell back to the proxy's address, which matched no rule."""
    from distillguard.gateway.clientip import forwarded_for

    resolver = ClientIPResolver(["127.0.0.0/8", "10.0.0.0/8"])
    both = forwarded_for(["8.8.8.8", "5.160.0.1"])
    assert resolver.resolve("127.0.0.1", both) == "5.160.0.1"
    assert resolver.resolve("127.0.0.1", forwarded_for(["5.160.0.1", "10.1.1.1"])) == \
        "5.160.0.1"
    assert resolver.resolve("127.0.0.1", "5.160.0.1:4711") == "5.160.0.1"
    assert resolver.resolve("127.0.0.1", "[2A01:5EC0::1]:443") == "2a01:5ec0::1"
    assert resolver.resolve("127.0.0.1", "unknown") is None
    assert resolver.resolve("127.0.0.1", "1.2.3.4, unknown, 10.0.0.5") is None
    assert forwarded_for([]) is None


def test_transition_addresses_are_placed_by_the_ipv4_they_carry() -> None:
    """6to4, Teredo and NAT64 (64:ff9b::/96) addresses are looked up at the IPv4
    address they carry; the address and its prefix stay as written."""
    geo = default_geoip()
    for address in ("2002:af2d:b001::1", "2001:0:4136:e378:8000:63bf:50d2:4ffe",
                    "64:ff9b::af2d:b001"):
        info = geo.lookup(address)
        assert (info.ip, info.country, info.private) == (address, "KP", False)
    assert geo.lookup("2002:af2d:b001::1").prefix == "2002:af2d:b001::/48"
    # one that carries a private address is private
    assert geo.lookup("2002:a00:1::1").private
    listed = GeoIP(FixedDatabase("Deutsche Telekom AG"), hosting_networks=["51.1.0.0/16"])
    assert listed.lookup("64:ff9b::3301:203").hosting
