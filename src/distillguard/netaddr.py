"""Host and port as a URL or a message writes them."""

from __future__ import annotations


def authority(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (RFC 3986 §3.2.2): ``[::1]:8080``.
    Unbracketed, the port reads as one more group of the address and a client cannot
    connect to the URL."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
