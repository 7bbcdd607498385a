"""Admin actions: off by default; with admin.actions.token_file, POST
/tunnels/{id}/close and POST /drain with a bearer token; 401 without it; never
by a GET; every attempt logged as admin_action."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from relay import config
from tests.support.helpers import connect_head, dial, read_head, tcp_peer
from tests.support.relay import RAW_HOST, WAIT, RelayProcess, StartRelay, peer_config

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-0123456789abcdef"


def post(relay: RelayProcess, path: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{relay.admin}{path}", data=b"", method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def hold(conn: socket.socket) -> None:
    conn.recv(1)  # until the relay closes the tunnel


def test_actions_are_off_without_a_token_file(start_relay: StartRelay) -> None:
    with tcp_peer(hold) as (port, _):
        relay = start_relay(peer_config(port))
        assert post(relay, "/drain", TOKEN)[0] == 404
        assert relay.get("/readyz")[0] == 200
        assert json.loads(relay.get("/status")[1])["actions"] is False


def test_close_a_tunnel_and_drain_with_the_token_only(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with tcp_peer(hold) as (port, _):
        relay = start_relay(peer_config(port, admin={"actions": {"token_file": str(token_file)}}))
        with dial(relay.proxy) as sock:
            sock.sendall(connect_head(f"{RAW_HOST}:443"))
            assert read_head(sock).startswith(b"HTTP/1.1 200 ")
            [t] = json.loads(relay.get("/tunnels")[1])
            assert post(relay, f"/tunnels/{t['id']}/close")[0] == 401
            assert post(relay, f"/tunnels/{t['id']}/close", "wrong-token-0123456789")[0] == 401
            assert relay.get(f"/tunnels/{t['id']}/close")[0] == 404  # no GET reaches it
            assert json.loads(relay.get("/tunnels")[1]) != []
            assert post(relay, f"/tunnels/{t['id']}/close", TOKEN)[0] == 200
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert closed["reason"] == "admin_close" and closed["tunnel"] == t["id"]
            assert sock.recv(1) == b""
        assert post(relay, "/tunnels/999999/close", TOKEN)[0] == 404
        outcomes = []
        for _ in range(4):
            line = relay.wait_event(lambda e: e["event"] == "admin_action")
            outcomes.append(line["outcome"])
            assert TOKEN not in json.dumps(line)
        assert outcomes == ["unauthorized", "unauthorized", "closed", "no_such_tunnel"]
        assert json.loads(relay.get("/status")[1])["actions"] is True
        assert post(relay, "/drain", TOKEN)[0] == 202
        relay.wait_event(lambda e: e["event"] == "stopped")


def test_a_short_or_missing_token_file_is_a_config_error(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    for path, expected in ((short, "at least 16"), (tmp_path / "absent", "cannot read")):
        with pytest.raises(config.ConfigError) as info:
            config.build({"admin": {"actions": {"token_file": str(path)}}})
        [error] = info.value.errors
        assert error.startswith("admin.actions") and expected in error, error
