"""The command line as operators run it: ``check``, ``policy`` and ``run`` as real
processes (``python -m relay`` and the ``konnect-relay`` console script), their
exit codes and what they print."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import CONSOLE_SCRIPT, ROOT, connect_via, relay_cli, write_config
from tests.support.relay import WAIT, StartRelay, free_port, relay_config

DEFAULT_CONFIG = ROOT / "config" / "relay.yaml"


def policy_fields(stdout: str) -> tuple[str, dict[str, str]]:
    """``konnect-relay policy`` output: the verdict line, then ``name: value`` lines."""
    first, *rest = stdout.splitlines()
    return first, {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in rest)}


# --- check -------------------------------------------------------------------------


def test_check_shipped_default() -> None:
    proc = relay_cli("check", "--config", str(DEFAULT_CONFIG))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{DEFAULT_CONFIG}: ok\n"
    assert proc.stderr == ""


def test_check_test_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        relay_config(
            resolver={"static": {"dp-test.eu.cp0.konghq.com": "127.0.0.1:8443"}},
            konnect={"regions": ["eu"], "control_planes": ["dp-test"]},
            allow=["*.example.com:8443"],
            deny=["evil.example.com:8443"],
        ),
    )
    proc = relay_cli("check", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: ok"


BROKEN = """\
listen:
  - address: 127.0.0.1
admin:
  address: 127.0.0.1:9464
  extra: true
konnect:
  regions: [eu, mars]
  ports: [443, 0]
allow:
  - "*.com"
resolver:
  allow_private: "yes"
limits:
  idle_timeout: 0
  bogus: 5
"""
BROKEN_ERRORS = [
    "listen.0.address: '127.0.0.1' is not host:port (IPv6: [::1]:3128)",
    "admin.extra: unknown key",
    "konnect.regions.1: must be one of 'au', 'eu', 'me', 'in', 'sg' or 'us' (got 'mars')",
    "konnect.ports.1: must be >= 1",
    'allow.0: "*.com" would allow every host under the top-level domain "com"; '
    'name a domain, e.g. "*.example.com"',
    "resolver.allow_private: must be a bool (got 'yes')",
    "limits.idle_timeout: must be > 0",
    "limits.bogus: unknown key",
]


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_check_lists_every_error(tmp_path: Path, script: bool) -> None:
    path = write_config(tmp_path, BROKEN)
    proc = relay_cli("check", "--config", str(path), script=script)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == f"{path}: {len(BROKEN_ERRORS)} error(s)"
    assert sorted(line.strip() for line in lines[1:]) == sorted(BROKEN_ERRORS)
    assert all(line.startswith("  ") for line in lines[1:])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("limits:\n  idle_timeout: 1\n  idle_timeout: 2\n", "line 3, column 3: duplicate key"),
        ("limits: {idle_timeout: 1\n", "line 2, column 1: "),
        ("- just\n- a list\n", "<top>: must be a mapping (got list)"),
    ],
)
def test_check_yaml_problems(tmp_path: Path, text: str, error: str) -> None:
    path = write_config(tmp_path, text)
    proc = relay_cli("check", "--config", str(path))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"{path}: 1 error(s)"
    assert proc.stderr.splitlines()[1].startswith(f"  {error}"), proc.stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_check_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "relay.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"limits:\n  idle_timeout: \xff\n")
    proc = relay_cli("check", "--config", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    first, second, *rest = proc.stderr.splitlines()
    assert first == f"{path}: 1 error(s)"
    assert second.startswith(f"  {path}: cannot read: "), second
    assert rest == []


def test_check_requires_config() -> None:
    proc = relay_cli("check")
    assert proc.returncode == 2
    assert "--config" in proc.stderr


# --- policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        ("cloud.konghq.com:443", "konnect:cloud.konghq.com"),
        ("abc123.eu.cp0.konghq.com:443", "konnect:{cp}.eu.cp0.konghq.com"),
        ("abc123.us.tp0.konghq.com:443", "konnect:{cp}.us.tp0.konghq.com"),
        ("global.api.konghq.com:443", "konnect:global.api.konghq.com"),
        ("CLOUD.KongHQ.com.:443", "konnect:cloud.konghq.com"),
    ],
)
def test_policy_allowed(target: str, rule: str) -> None:
    proc = relay_cli("policy", target, script=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdict, fields = policy_fields(proc.stdout)
    assert verdict == f"allow {target}"
    assert fields["reason"] == "konnect"
    assert fields["rule"] == rule
    assert fields["egress"] == "direct"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("evil.com:443", "not_allowlisted"),
        ("cloud.konghq.com.evil.com:443", "not_allowlisted"),
        ("0x7f000001:443", "ip_literal"),
        ("127.0.0.1:443", "ip_literal"),
        ("a.b.eu.cp0.konghq.com:443", "not_allowlisted"),
        ("cloud.konghq.com:8443", "port_not_allowed"),
        ("abc.xx.cp0.konghq.com:443", "not_allowlisted"),
    ],
)
def test_policy_denied(target: str, reason: str) -> None:
    proc = relay_cli("policy", target, script=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdict, fields = policy_fields(proc.stdout)
    assert verdict == f"deny {target}"
    assert fields["reason"] == reason
    assert "egress" not in fields


@pytest.mark.parametrize("target", ["nohost", "cloud.konghq.com:https", ":443"])
def test_policy_bad_target(target: str) -> None:
    proc = relay_cli("policy", target)
    assert proc.returncode == 1
    assert f"{target!r} is not HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("target", "verdict", "reason", "rule"),
    [
        ("api.example.com:8443", "allow", "allow_rule", "allow:*.example.com:8443"),
        ("bad.example.com:8443", "deny", "deny_rule", "deny:bad.example.com:8443"),
        ("api.example.com:443", "deny", "not_allowlisted", "-"),
        ("abc.eu.cp0.konghq.com:443", "allow", "konnect", "konnect:{cp}.eu.cp0.konghq.com"),
        ("abc.us.cp0.konghq.com:443", "deny", "not_allowlisted", "-"),  # region not listed
        (
            "blocked.eu.cp0.konghq.com:443",
            "deny",
            "deny_rule",
            "deny:blocked.eu.cp0.konghq.com:443",
        ),
    ],
)
def test_policy_honours_config(
    tmp_path: Path, target: str, verdict: str, reason: str, rule: str
) -> None:
    path = write_config(
        tmp_path,
        {
            "konnect": {"regions": ["eu"]},
            "allow": ["*.example.com:8443"],
            "deny": ["bad.example.com:8443", "blocked.eu.cp0.konghq.com"],
        },
    )
    proc = relay_cli("policy", target, "--config", str(path), script=True)
    assert proc.returncode == (0 if verdict == "allow" else 1), proc.stdout + proc.stderr
    first, fields = policy_fields(proc.stdout)
    assert first == f"{verdict} {target}"
    assert fields["reason"] == reason
    assert fields["rule"] == rule


def test_policy_with_invalid_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"allow": ["*.com"]})
    proc = relay_cli("policy", "cloud.konghq.com:443", "--config", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "allow.0: " in proc.stderr


# --- run ---------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (TIME_WAIT leftovers do not count: the
    relay binds with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_run_embedded_default(start_relay: StartRelay) -> None:
    busy = [p for p in (3128, 9464) if not port_is_free(p)]
    if busy:
        pytest.skip(f"127.0.0.1:{busy} already in use; the embedded default needs 3128 and 9464")
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("the konnect-relay console script is not installed in this environment")
    relay = start_relay(command=[str(CONSOLE_SCRIPT), "run"])  # the written config is unused
    assert relay.proxy == ("127.0.0.1", 3128)
    assert relay.admin == "127.0.0.1:9464"
    assert relay.get("/healthz") == (200, "ok\n")
    assert relay.get("/readyz")[0] == 200
    # The proxy port answers, and the embedded policy refuses what is not Konnect
    # (nothing leaves the machine: the refusal comes before any dial).
    sock, reply = connect_via(relay, "evil.com:443")
    sock.close()
    assert reply.startswith(b"HTTP/1.1 403 "), reply
    relay.proc.terminate()
    assert relay.proc.wait(WAIT * 3) == 0
    assert relay.stop() == 0
    assert port_is_free(3128) and port_is_free(9464)


def test_run_with_config_file(tmp_path: Path, start_relay: StartRelay) -> None:
    path = write_config(tmp_path, relay_config())
    relay = start_relay(command=[sys.executable, "-m", "relay", "run", "--config", str(path)])
    assert relay.get("/healthz") == (200, "ok\n")
    relay.proc.terminate()
    assert relay.proc.wait(WAIT * 3) == 0


def test_run_invalid_config_does_not_listen(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(
        tmp_path,
        {"listen": [{"address": f"127.0.0.1:{port}"}], "limits": {"idle_timeout": 0}},
    )
    proc = relay_cli("run", "--config", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""  # not even a "listening" event
    assert "limits.idle_timeout: must be > 0" in proc.stderr
    assert port_is_free(port)


def test_run_unreadable_config(tmp_path: Path) -> None:
    proc = relay_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "cannot read" in proc.stderr


def test_run_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write_config(tmp_path, relay_config(listen=[{"address": f"127.0.0.1:{port}"}]))
        proc = relay_cli("run", "--config", str(path))
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("target", "code", "lines"),
    [
        ("a1.eu.cp0.konghq.com:443", 0, ["allow a1.eu.cp0.konghq.com:443", "  egress: ssh"]),
        ("x.example.com:443", 1, ["deny x.example.com:443", "  reason: route_denied"]),
        ("y.example.com:443", 0, ["allow y.example.com:443", "  egress: direct"]),
    ],
)
def test_policy_names_the_route(tmp_path: Path, target: str, code: int, lines: list[str]) -> None:
    """`policy` prints the egress egress.routes picks, and a `deny` route denies."""
    config = {
        "allow": ["x.example.com", "y.example.com"],
        "egress": {
            "mode": "direct",
            "ssh": {"host": "bastion.test", "username": "u", "known_hosts": "/dev/null"},
            "routes": [
                {"match": ["*.konghq.com"], "via": "ssh"},
                {"match": ["x.example.com"], "via": "deny"},
            ],
        },
    }
    path = write_config(tmp_path, config)
    proc = relay_cli("policy", target, "--config", str(path))
    assert proc.returncode == code, proc.stdout + proc.stderr
    for line in lines:
        assert line in proc.stdout.splitlines(), proc.stdout


def test_policy_decides_as_the_relay_does_for_a_client(tmp_path: Path) -> None:
    """`policy` runs the relay's own admission: clients: entries, clients_only
    and policy_mode: report count, for the client named by --user/--cert/--source."""
    path = write_config(
        tmp_path,
        {
            "konnect": {"regions": ["eu", "us"]},
            "clients": [
                {
                    "name": "team-eu",
                    "match": {"users": ["dp-eu"], "cidrs": ["10.1.0.0/16"]},
                    "konnect": {"regions": ["eu"]},
                }
            ],
            "clients_only": True,
        },
    )
    us = "a1.us.cp.konghq.com:443"
    eu = "a1.eu.cp.konghq.com:443"
    proc = relay_cli("policy", eu, "--config", str(path))
    assert proc.returncode == 1
    assert policy_fields(proc.stdout)[1]["reason"] == "client_not_listed"
    for who in (["--user", "dp-eu"], ["--source", "10.1.2.3"]):
        proc = relay_cli("policy", eu, "--config", str(path), *who)
        assert proc.returncode == 0, proc.stdout
        assert policy_fields(proc.stdout)[1]["client"] == "team-eu"
        proc = relay_cli("policy", us, "--config", str(path), *who)
        assert proc.returncode == 1, proc.stdout
        assert policy_fields(proc.stdout)[1]["reason"] == "not_allowlisted"

    report = write_config(tmp_path, {"policy_mode": "report"}, name="report.yaml")
    proc = relay_cli("policy", "evil.example.com:443", "--config", str(report))
    assert proc.returncode == 0, proc.stdout
    verdict, fields = policy_fields(proc.stdout)
    assert verdict == "allow evil.example.com:443"
    assert fields["reason"] == "not_allowlisted"
    assert fields["mode"].startswith("report")
    # a malformed host is refused in report mode too
    proc = relay_cli("policy", "a b:443", "--config", str(report))
    assert proc.returncode == 1


@pytest.mark.parametrize(
    "command", ["policy cloud.konghq.com:443", "presets", "check --config /dev/null"]
)
def test_output_into_a_closed_pipe_ends_quietly(command: str) -> None:
    """Like Unix tools, a command whose reader is gone ends on SIGPIPE, quietly
    (`true` exits without reading, long before Python has started)."""
    proc = subprocess.run(
        f"{sys.executable} -m relay {command} | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stderr == ""
