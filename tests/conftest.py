"""Fixtures: a trustme CA, a fake Konnect control plane that demands a client
certificate, and the relay started as a real subprocess (tests/support)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.relay import (
    CP_HOST,
    TP_HOST,
    Certs,
    FakeControlPlane,
    ListenerCerts,
    LoopThread,
    RelayProcess,
    StartRelay,
    assert_canonical_lines,
    cert_sha256,
    relay_config,
)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert(CP_HOST, TP_HOST, "*.eu.cp0.konghq.com", "*.eu.tp0.konghq.com")
    client = ca.issue_cert("dp-1.example.test", common_name="dp-1")
    paths = {}
    for name, blob in {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": client.cert_chain_pems[0].bytes(),
        "client.key": client.private_key_pem.bytes(),
        "client-full.pem": client.cert_chain_pems[0].bytes() + client.private_key_pem.bytes(),
    }.items():
        (d / name).write_bytes(blob)
        paths[name] = d / name
    return Certs(
        ca=ca,
        ca_file=paths["ca.pem"],
        server_cert=paths["server.pem"],
        server_key=paths["server.key"],
        client_cert=paths["client.pem"],
        client_key=paths["client.key"],
        client_pem=paths["client-full.pem"],
        server_sha256=cert_sha256(server.cert_chain_pems[0].bytes()),
        client_sha256=cert_sha256(client.cert_chain_pems[0].bytes()),
    )


@pytest.fixture(scope="session")
def listener_certs(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> ListenerCerts:
    d = tmp_path_factory.mktemp("listener")
    server = certs.ca.issue_cert("localhost", "127.0.0.1")
    client = certs.ca.issue_cert("dp-7.example.test", common_name="dp-proxy-7")
    stranger = trustme.CA().issue_cert("dp-8.example.test", common_name="dp-proxy-8")
    files = {
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": client.cert_chain_pems[0].bytes(),
        "client.key": client.private_key_pem.bytes(),
        "stranger.pem": stranger.cert_chain_pems[0].bytes(),
        "stranger.key": stranger.private_key_pem.bytes(),
    }
    for name, blob in files.items():
        (d / name).write_bytes(blob)
    return ListenerCerts(
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "stranger.pem",
        d / "stranger.key",
    )


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def fake_cp(certs: Certs, loop_thread: LoopThread) -> Iterator[FakeControlPlane]:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response

    state = FakeControlPlane(port=0)

    def fingerprint(conn: ServerConnection) -> str:
        sslobj = conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        fp = hashlib.sha256(der).hexdigest() if der else ""
        state.seen.append(fp)
        return fp

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/whoami":
            body = json.dumps({"client_cert_sha256": fingerprint(conn)}).encode()
            headers = Headers(
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
            )
            return Response(200, "OK", headers, body)
        return None

    async def handler(conn: ServerConnection) -> None:
        fp = fingerprint(conn)
        async for message in conn:
            await conn.send(f"{fp}:{message}")

    async def start() -> Any:
        return await serve(
            handler,
            "127.0.0.1",
            0,
            ssl=certs.server_context(),
            process_request=process_request,
            ping_interval=None,
        )

    server = loop_thread.run(start())
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[StartRelay]:
    """``start(config=relay_config(), **options)``: a RelayProcess (options as
    its keywords), stopped when the test ends."""
    started: list[RelayProcess] = []

    def start(config: dict[str, Any] | None = None, **options: Any) -> RelayProcess:
        sub = tmp_path / f"relay{len(started)}"
        sub.mkdir()
        relay = RelayProcess(config if config is not None else relay_config(), sub, **options)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()
    for relay in started:
        assert_canonical_lines(relay.lines)


@pytest.fixture
def relay(start_relay: StartRelay, fake_cp: FakeControlPlane) -> RelayProcess:
    """A relay whose Konnect names lead to the fake control plane."""
    target = f"127.0.0.1:{fake_cp.port}"
    return start_relay(relay_config(resolver={"static": {CP_HOST: target, TP_HOST: target}}))
