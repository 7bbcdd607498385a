"""/clients: data planes (client identities), what they reach, and their state.

Four data planes on four loopback source addresses, through a real relay to
the fake mTLS control plane: one with configuration and telemetry tunnels
(ok), one without telemetry (no_telemetry), one refused, one reconnecting in
a loop (flapping). The states, the gauge and the filters are read back from
the admin endpoint."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from tests.support.helpers import connect_head, dial, read_head
from tests.support.relay import (
    CP_HOST,
    TP_HOST,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    relay_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

OK, NO_TELEMETRY, REFUSED, FLAPPING = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


@contextmanager
def tunnel(relay: RelayProcess, source: str, host: str) -> Iterator[socket.socket]:
    """A tunnel from ``source`` to host:443 (open until the block ends)."""
    sock = dial(relay.proxy, source)
    try:
        sock.sendall(connect_head(f"{host}:443"))
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        yield sock
    finally:
        sock.close()


def get_json(relay: RelayProcess, path: str) -> Any:
    status, body = relay.get(path)
    assert status == 200, body
    return json.loads(body)


def by_identity(relay: RelayProcess, path: str = "/clients") -> dict[str, dict[str, Any]]:
    return {c["identity"]: c for c in get_json(relay, path)}


def test_states_gauge_and_filters_of_four_data_planes(
    start_relay: StartRelay, fake_cp: FakeControlPlane
) -> None:
    target = f"127.0.0.1:{fake_cp.port}"
    relay = start_relay(
        relay_config(
            resolver={"static": {CP_HOST: target, TP_HOST: target}, "allow_private": True},
            limits={"tls_peek_timeout": 60, "reconnect_window": 60},
            data_planes={"no_telemetry_after": 0.5, "flapping_reconnects": 3},
        )
    )
    with ExitStack() as open_tunnels:
        for host in (CP_HOST, TP_HOST, TP_HOST):  # Kong: outlet + workers' telemetry
            open_tunnels.enter_context(tunnel(relay, OK, host))
        open_tunnels.enter_context(tunnel(relay, NO_TELEMETRY, CP_HOST))
        with dial(relay.proxy, REFUSED) as sock:
            sock.sendall(connect_head("evil.example.com:443"))
            assert read_head(sock).startswith(b"HTTP/1.1 403 ")
        for _ in range(4):  # opened and closed again and again: three reconnects
            with tunnel(relay, FLAPPING, CP_HOST):
                pass
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")

        wait_until(
            lambda: by_identity(relay).get(NO_TELEMETRY, {}).get("state") == "no_telemetry",
            what="no_telemetry after data_planes.no_telemetry_after",
        )
        view = by_identity(relay)
        assert {i: view[i]["state"] for i in (OK, NO_TELEMETRY, REFUSED, FLAPPING)} == {
            OK: "ok",
            NO_TELEMETRY: "no_telemetry",
            REFUSED: "refused",
            FLAPPING: "flapping",
        }
        [plane] = view[OK]["control_planes"]
        assert plane == {
            "control_plane": "dp-test",
            "region": "eu",
            "config": 1,
            "telemetry": 2,
            "other": 0,
        }
        assert view[OK]["tunnels"] == 3 and view[OK]["oldest"] and view[OK]["newest"]
        assert view[FLAPPING]["reconnects"] == 3 and view[FLAPPING]["tunnels"] == 0
        refusal = view[REFUSED]["last_refusal"]
        assert refusal["reason"] == "not_allowlisted" and refusal["status"] == 403
        assert refusal["target"] == "evil.example.com:443"

        for state, count in (("ok", 1), ("no_telemetry", 1), ("refused", 1), ("flapping", 1)):
            assert relay.sample("konnect_relay_data_planes", state=state) == count, state
        assert relay.sample("konnect_relay_data_planes", state="gone") == 0

        assert list(by_identity(relay, "/clients?state=no_telemetry")) == [NO_TELEMETRY]
        mine = get_json(relay, f"/tunnels?client={OK}")
        assert len(mine) == 3 and {t["client"] for t in mine} == {OK}
        telemetry = get_json(relay, "/tunnels?host=.tp0.")
        assert len(telemetry) == 2 and {t["host"] for t in telemetry} == {TP_HOST}
        assert get_json(relay, "/tunnels?client=192.0.2.99") == []

    # All closed: the ok and no_telemetry data planes are gone, not forgotten.
    wait_until(lambda: not get_json(relay, "/tunnels"), what="every tunnel closed")
    view = by_identity(relay)
    assert view[OK]["state"] == "gone" and view[NO_TELEMETRY]["state"] == "gone"
