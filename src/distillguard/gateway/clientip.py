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

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address, in canonical form (:func:`~distillguard.geoip.
        canonical_ip`: a dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``,
        which no IPv4 trusted proxy, country or prefix matched)."""
        if peer is not None:
            peer = canonical_ip(peer)
        if not self.networks or peer is None or not self._trusted(peer):
            return peer
        if not forwarded_for:
            return peer
        hops = [canonical_ip(h.strip()) for h in forwarded_for.split(",") if h.strip()]
        client = peer
        for hop in reversed(hops):
            client = hop
            if not self._trusted(hop):
                break
        try:
            ipaddress.ip_address(client)
        except ValueError:
            return peer
        return client
