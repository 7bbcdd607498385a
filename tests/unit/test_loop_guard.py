"""The loop guard's table: which destinations would reach the relay's own listeners."""

from __future__ import annotations

import ipaddress

import pytest


@pytest.mark.parametrize(
    ("listening", "address", "port", "loop"),
    [
        (("127.0.0.1", 8443), "127.0.0.1", 8443, True),
        (("127.0.0.1", 8443), "127.0.0.1", 443, False),
        (("127.0.0.1", 8443), "127.0.0.2", 8443, False),  # a 127.0.0.1 socket does not get it
        (("127.0.0.1", 8443), "::ffff:127.0.0.1", 8443, True),
        (("127.0.0.1", 8443), "0.0.0.0", 8443, True),
        (("127.0.0.1", 8443), "::", 8443, True),
        (("::1", 8443), "::1", 8443, True),
        (("::1", 8443), "127.0.0.1", 8443, False),
        (("0.0.0.0", 8443), "127.0.0.5", 8443, True),
        (("0.0.0.0", 8443), "::ffff:127.0.0.1", 8443, True),
        (("0.0.0.0", 8443), "192.0.2.1", 8443, False),  # TEST-NET-1, never local
        (("::", 8443), "127.0.0.1", 8443, True),
        (("::", 8443), "::1", 8443, True),
        (("::", 8443), "2001:db8::1", 8443, False),
    ],
)
def test_is_self_table(listening: tuple[str, int], address: str, port: int, loop: bool) -> None:
    from relay.resolver import Resolver

    resolver = Resolver({}, allow_private=True, cache_ttl=0)
    resolver.listening.add(listening)
    assert resolver.is_self(ipaddress.ip_address(address), port) is loop
