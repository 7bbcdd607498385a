"""The head phase as a sans-IO machine (relay/head.py), fed byte by byte: the
same answer whatever the split, PROXY header then CONNECT head or ClientHello,
early bytes kept, refusals with their status and reason."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.head import NEED_DATA, Head, HeadReader, Refusal

CONNECT = b"CONNECT dp1.eu.cp.konghq.com:443 HTTP/1.1\r\nHost: dp1.eu.cp.konghq.com:443\r\n\r\n"
PROXY_V1 = b"PROXY TCP4 10.1.2.3 10.0.0.1 51514 3128\r\n"


def reader(*, proxy: bool = False, sni_port: int | None = None) -> HeadReader:
    return HeadReader("127.0.0.1", "127.0.0.1:40000", proxy_protocol=proxy, sni_port=sni_port)


def feed_in_pieces(r: HeadReader, data: bytes, cuts: list[int]) -> object:
    """Feed ``data`` cut at ``cuts``; every answer before the last must be NEED_DATA."""
    pieces, last = [], 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            pieces.append(data[last:cut])
            last = cut
    pieces.append(data[last:])
    for piece in pieces[:-1]:
        assert r.feed(piece) is NEED_DATA
    return r.feed(pieces[-1])


def hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_connect_head_byte_by_byte_with_early_bytes() -> None:
    r = reader()
    # The last piece completes the head and carries the first tunnel bytes
    # (later ones are the connection's to keep, not the machine's).
    data = CONNECT + b"\x16\x03\x01early"
    answer = feed_in_pieces(r, data, list(range(1, len(CONNECT) - 1)))
    assert isinstance(answer, Head)
    assert (answer.request.host, answer.request.port) == ("dp1.eu.cp.konghq.com", 443)
    assert answer.early == b"\x16\x03\x01early"
    assert (answer.client_ip, answer.peer) == ("127.0.0.1", "127.0.0.1:40000")


@given(st.lists(st.integers(1, len(PROXY_V1 + CONNECT) - 1), max_size=8))
def test_proxy_header_then_connect_any_split(cuts: list[int]) -> None:
    answer = feed_in_pieces(reader(proxy=True), PROXY_V1 + CONNECT, cuts)
    assert isinstance(answer, Head)
    assert (answer.client_ip, answer.peer) == ("10.1.2.3", "10.1.2.3:51514")
    assert answer.early == b""


def test_proxy_header_alone_needs_more() -> None:
    assert reader(proxy=True).feed(PROXY_V1) is NEED_DATA


@pytest.mark.parametrize(
    ("data", "proxy", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, 405, "method_not_allowed"),
        (b"\x16\x03\x01\x00\x05hello", False, 400, "tls_on_plaintext_port"),
        (b"CONNECT a.example:443 HTTP/2.0\r\n\r\n", False, 505, "version_not_supported"),
        (b"CONNECT a.example:443 HTTP/1.1\nHost: a\n\n", False, 400, "bad_request"),
        (b"NOTPROXY\r\n" + CONNECT, True, 400, "bad_proxy_protocol"),
    ],
)
def test_refusals(data: bytes, proxy: bool, status: int, reason: str) -> None:
    answer = reader(proxy=proxy).feed(data)
    assert isinstance(answer, Refusal)
    assert (answer.status, answer.reason) == (status, reason)
    assert answer.detail


def test_a_refusal_in_pieces_is_the_same_refusal() -> None:
    data = b"CONNECT a.example:443 HTTP/1.1\r\nBad Header: x\r\n\r\n"
    whole = reader().feed(data)
    r = reader()
    answer: object = NEED_DATA
    for i in range(len(data)):
        answer = r.feed(data[i : i + 1])
        if answer is not NEED_DATA:
            break
    assert answer == whole


def test_sni_listener_takes_the_target_from_the_hello() -> None:
    data = hello("dp1.eu.cp.konghq.com")
    r = reader(sni_port=443)
    answer = feed_in_pieces(r, data, list(range(7, len(data), 13)))
    assert isinstance(answer, Head)
    assert (answer.request.host, answer.request.port, answer.request.version) == (
        "dp1.eu.cp.konghq.com",
        443,
        "TLS",
    )
    assert answer.early == data  # forwarded unchanged


def test_sni_listener_refuses_a_hello_without_a_name() -> None:
    answer = reader(sni_port=443).feed(hello(None))
    assert isinstance(answer, Refusal)
    assert (answer.status, answer.reason) == (400, "no_sni")


def test_sni_listener_refuses_plain_http() -> None:
    answer = reader(sni_port=443).feed(CONNECT)
    assert isinstance(answer, Refusal)
    assert answer.reason == "not_tls"
