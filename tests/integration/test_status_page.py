"""The status page at the admin listener's ``/``: served by the relay itself,
strict Content-Security-Policy, and rendered by a real headless Chromium
(Debian's chromium and chromium-driver, driven by selenium) from a relay with
live tunnels from two data planes, one of them without telemetry."""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import connect_head, dial, read_head
from tests.support.relay import (
    CP_HOST,
    TP_HOST,
    WAIT,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    relay_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

OK, NO_TELEMETRY, REFUSED = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@contextmanager
def tunnel(relay: RelayProcess, source: str, host: str) -> Iterator[socket.socket]:
    sock = dial(relay.proxy, source)
    try:
        sock.sendall(connect_head(f"{host}:443"))
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        yield sock
    finally:
        sock.close()


def config(fake_cp: FakeControlPlane) -> dict[str, Any]:
    target = f"127.0.0.1:{fake_cp.port}"
    return relay_config(
        resolver={"static": {CP_HOST: target, TP_HOST: target}, "allow_private": True},
        limits={"tls_peek_timeout": 90},
        data_planes={"no_telemetry_after": 0.5},
    )


def fetch(relay: RelayProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(f"http://{relay.admin}{path}", timeout=WAIT) as resp:
        return resp.status, dict(resp.headers), resp.read()


def refuse_one(relay: RelayProcess) -> None:
    with dial(relay.proxy, REFUSED) as sock:
        sock.sendall(connect_head("evil.example.com:443"))
        assert read_head(sock).startswith(b"HTTP/1.1 403 ")


def test_the_page_its_files_and_its_json_come_from_the_relay(
    start_relay: StartRelay, fake_cp: FakeControlPlane
) -> None:
    relay = start_relay(config(fake_cp))
    refuse_one(relay)
    status, headers, body = fetch(relay, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    html = body.decode()
    assert "/page/status.js" in html and "http" not in html.replace('lang="en"', "")
    for path in ("/page/status.js", "/page/status.css"):
        status, headers, body = fetch(relay, path)
        assert status == 200 and body and b"http" not in body, path
    status, _, body = fetch(relay, "/status")
    state = json.loads(body)
    assert state["ready"] is True and state["actions"] is False
    assert state["denied"] == {"not_allowlisted": 1}
    assert state["open_files"]["open"] > 0 and state["open_files"]["limit"] > 0
    assert [e["name"] for e in state["egress"]] == ["direct"]
    [refusal] = json.loads(fetch(relay, "/refusals")[2])
    assert refusal["target"] == "evil.example.com:443" and refusal["reason"] == "not_allowlisted"
    assert refusal["client"].startswith(f"{REFUSED}:") and refusal["status"] == 403


def chromium() -> Any:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver must be installed (.ci/run)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_headless_chromium_renders_data_planes_states_and_refusals(
    start_relay: StartRelay, fake_cp: FakeControlPlane, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    relay = start_relay(config(fake_cp))
    browser = chromium()
    with ExitStack() as stack:
        stack.callback(browser.quit)
        for source, hosts in ((OK, (CP_HOST, TP_HOST)), (NO_TELEMETRY, (CP_HOST,))):
            for host in hosts:
                stack.enter_context(tunnel(relay, source, host))
        wait_until(
            lambda: any(
                c["state"] == "no_telemetry" for c in json.loads(fetch(relay, "/clients")[2])
            ),
            what="the data plane without telemetry",
        )
        refuse_one(relay)
        origin = f"http://{relay.admin}"
        browser.get(f"{origin}/")
        wait = WebDriverWait(browser, WAIT)

        def rows(table: str) -> list[list[str]]:
            # In one script: the page re-renders its tables every 2 s.
            return list(
                browser.execute_script(
                    "return [...document.querySelectorAll(arguments[0])].map("
                    "r => [...r.cells].map(c => c.textContent))",
                    f"#{table} tbody tr",
                )
            )

        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        wait.until(lambda b: len(rows("clients")) == 3 and rows("refusals"))
        states = {r[0]: r[1] for r in rows("clients")}
        assert states == {OK: "ok", NO_TELEMETRY: "no_telemetry", REFUSED: "refused"}
        badge = browser.execute_script(
            "const b = document.querySelector('#clients .state-no_telemetry');"
            "return b && getComputedStyle(b).backgroundColor"
        )
        assert badge == "rgb(255, 240, 194)"  # highlighted by the page's own stylesheet
        [refusal] = rows("refusals")
        assert refusal[3] == "evil.example.com:443" and refusal[5] == "not_allowlisted"
        tunnels = rows("tunnels")
        assert len(tunnels) == 3
        assert sorted(r[2] for r in tunnels) == sorted([f"{CP_HOST}:443"] * 2 + [f"{TP_HOST}:443"])
        assert "ready" in browser.find_element(By.ID, "summary").text

        # The filter narrows the live tunnels without a request of its own.
        browser.find_element(By.ID, "filter-host").send_keys(".tp0.")
        wait.until(lambda b: len(rows("tunnels")) == 1)

        # Every request the page made went to the relay's own origin.
        urls = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert urls and all(u.startswith(origin + "/") for u in urls), urls
        browser.save_screenshot(str(tmp_path / "status-page.png"))
        assert (tmp_path / "status-page.png").stat().st_size > 10_000
        if os.environ.get("STATUS_PAGE_SCREENSHOT"):  # the README's picture
            shutil.copy(tmp_path / "status-page.png", os.environ["STATUS_PAGE_SCREENSHOT"])


def test_with_workers_the_supervisor_serves_the_page_and_merges_the_views(
    start_relay: StartRelay, fake_cp: FakeControlPlane
) -> None:
    relay = start_relay({**config(fake_cp), "workers": 2})
    wait_until(
        lambda: json.loads(fetch(relay, "/status")[2]).get("workers") == 2,
        what="both workers answering /status",
    )
    with tunnel(relay, OK, CP_HOST), tunnel(relay, OK, TP_HOST):
        wait_until(lambda: len(json.loads(fetch(relay, "/tunnels")[2])) == 2, what="2 tunnels")
        state = json.loads(fetch(relay, "/status")[2])
        assert state["tunnels"] == 2 and state["ready"] is True
        clients = json.loads(fetch(relay, f"/clients?client={OK}")[2])
        assert {c["identity"] for c in clients} == {OK}
        assert sum(c["tunnels"] for c in clients) == 2 and all("worker" in c for c in clients)
    status, headers, body = fetch(relay, "/")
    assert status == 200 and b"/page/status.js" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    refuse_one(relay)
    wait_until(lambda: json.loads(fetch(relay, "/refusals")[2]) != [], what="the refusal")
