"""``host:port`` as text, the one way the relay writes it (RFC 3986 §3.2.2:
an IPv6 address in brackets)."""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port`` for an IPv6 address (or anything with a colon)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
