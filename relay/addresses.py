"""The values the configuration writes as text: ``host:port`` addresses, the
sides of a ``resolver.static`` entry, nameservers and proxy URLs. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


def parse_address(text: str, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port). Port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6: [::1]:3128)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:3128")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port must be a number")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port must be in 1..65535")
    return host, port


def parse_static_side(text: str) -> tuple[str, int | None]:
    """One side of a ``resolver.static`` entry: ``host``, ``host:port``, ``[v6]:port``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        ipaddress.IPv6Address(host)
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") > 1:
        ipaddress.IPv6Address(text)
        return text, None
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ValueError("empty host")
        if not port_text:
            return host.lower().rstrip("."), None
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be in 1..65535")
    return host.lower().rstrip("."), int(port_text)


def nameserver_address(text: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` of a DNS server (port 53 by default)."""
    host, port = parse_static_side(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r} must be an IP address") from None
    return host, port or 53


@dataclass(frozen=True, slots=True)
class ProxyURL:
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None


def parse_proxy_url(text: str) -> ProxyURL:
    """``http(s)://[user:pass@]host:port`` (userinfo percent-decoded, like Kong)."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad proxy URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("proxy URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("proxy URL needs a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy URL takes no path, query or fragment")
    if port is None:
        raise ValueError("write the proxy port explicitly (http://host:3128)")
    return ProxyURL(
        parts.scheme,
        parts.hostname,
        port,
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
    )
