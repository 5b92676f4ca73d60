"""The client's IP address as seen through the configured trusted proxies.

``X-Forwarded-For`` is read right to left: each hop added by a trusted proxy is skipped,
and the first address not in ``server.trusted_proxies`` is the client. With no trusted
proxies the header is ignored and the TCP peer is the client, so a client cannot spoof
its address by sending the header itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from distillguard.geoip import canonical_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIPResolver:
    def __init__(self, trusted: Sequence[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in trusted]
        self._trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (a TCP peer's address) is one of the trusted proxies."""
        return peer is not None and bool(self.networks) and self._trusted(canonical_ip(peer))

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address, in canonical form (:func:`~distillguard.geoip.
        canonical_ip`: a dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``,
        which no IPv4 trusted proxy, country or prefix matched). ``forwarded_for`` is
        every ``X-Forwarded-For`` line joined in order with commas (:func:`forwarded_for`).
        A hop written with a port (``5.160.0.1:4711``, ``[2a01:5ec0::1]:443``, as some
        proxies add) is its address; a hop that is no address (``unknown``) makes the
        client unknown (None): the proxy's own address in its place matched no rule."""
        if peer is not None:
            peer = canonical_ip(peer)
        if not self.networks or peer is None or not self._trusted(peer):
            return peer
        if not forwarded_for:
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        client: str | None = peer
        for hop in reversed(hops):
            client = hop_address(hop)
            if client is None or not self._trusted(client):
                break
        return client


def hop_address(hop: str) -> str | None:
    """One ``X-Forwarded-For`` hop as an address in canonical form, a port stripped;
    None when it is no address."""
    text = hop
    if text.startswith("["):                       # [v6] or [v6]:port
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:                     # v4:port
        text = text.split(":", 1)[0]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return canonical_ip(text)


def forwarded_for(lines: Sequence[str]) -> str | None:
    """Every ``X-Forwarded-For`` line of a request as one list, in order (RFC 9110
    §5.3: lines of one field are its values joined with commas). Only the first line was
    read, so behind a proxy that adds a line of its own the client's own line decided."""
    return ", ".join(lines) if lines else None
