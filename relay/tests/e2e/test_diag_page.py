"""The diagnostics page (GET /diag) driven by a real browser: headless Chromium gathers ICE
candidates against the appliance's STUN and TURN over the transport chosen on the page (UDP,
TCP or TLS), runs a relayed data-channel echo between two relay-only peer connections, and
reads /metrics; the page lists the ICE server URLs of every configured transport.

Chromium gathers no candidates on a host with only loopback, so the appliance and the browser
run in two network namespaces of their own joined by a veth pair (see chromium.py). The page
runs by itself with `#auto=1&user=..&pass=..[&transport=tcp]` and writes its results as JSON
into <pre id="result" data-done="1">. Set ACTRIX_DIAG_SCREENSHOT=PATH to keep a screenshot of
the page after the run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chromium import (
    BROWSER_IP,
    SERVER_IP,
    Browser,
    BrowserNet,
    TestCa,
    browser_net,
    need_chromium,
    nss_home,
)
from conftest import PASSWORD, REST_SECRET, USER, Appliance, in_netns, metric_sum, metrics, toml_text

STUN_PORT = 3478
TLS_PORT = 5349
HTTP_PORT = 8080
BASE = f"http://{SERVER_IP}:{HTTP_PORT}"
# A name under .test (RFC 2606) for the TLS certificate; only the browser's
# --host-resolver-rules knows it.
TLS_NAME = "turn.actrix.test"


@pytest.fixture
def diag_net(request) -> BrowserNet:
    return browser_net(request, "diag")


def appliance_config(extra_turn: dict | None = None, extra_stun: dict | None = None) -> dict:
    turn = {
        "relay_addresses": [SERVER_IP],
        "allow_peers": ["10.213.0.0/24"],
        "rest_secrets": [REST_SECRET],
    }
    turn.update(extra_turn or {})
    return {
        "stun": {"listen": [f"{SERVER_IP}:{STUN_PORT}"], **(extra_stun or {})},
        "http": {"listen": f"{SERVER_IP}:{HTTP_PORT}"},
        "turn": turn,
    }


def start_appliance(actrix_bin, tmp_path: Path, net: BrowserNet, extra_turn=None,
                    extra_stun=None) -> Appliance:
    d = tmp_path / "appliance"
    d.mkdir(exist_ok=True)
    app = Appliance(actrix_bin, d, appliance_config(extra_turn, extra_stun), netns=net.server)
    app.start()
    status = http_get(net, "/diag")[0]
    if status != 200:
        app.__exit__(None, None, None)
        pytest.fail(
            f"GET /diag answered {status}: this binary does not serve the diagnostics page "
            "(merge actrix::diag::router into the control server in relay/src/main.rs)"
        )
    return app


def http_get(net: BrowserNet, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET from inside the server namespace, without following redirects; header names in
    lower case."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(BASE + path, headers=headers or {})
    with in_netns(net.server):
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture
def browser(diag_net, tmp_path):
    binary = need_chromium()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    b = Browser(binary, diag_net.browser, profile)
    yield b
    b.close()


# What the page shows, read from its DOM after a run: the transport choices, the addresses
# it listens on per transport, the table of URLs for applications, the RTCPeerConnection snippet, and the TURN URLs it tested.
DOM_JS = """JSON.stringify({
  transports: [...document.getElementById('transport').options].map(
    (o) => ({ value: o.value, disabled: o.disabled, selected: o.selected })),
  listeners: [...document.querySelectorAll('#listeners tr')].map((tr) => [...tr.cells].map((c) => c.textContent)),
  app_urls: [...document.querySelectorAll('#app-urls tr')].map((tr) => [...tr.cells].map((c) => c.textContent)),
  snippet: document.getElementById('ice-snippet').textContent,
  turn_shown: document.getElementById('turn-urls').textContent,
})"""


def run_page(browser: Browser, fragment: str, tmp_path: Path, timeout: float = 90) -> dict:
    """Open /diag#fragment, wait for the page to finish, return its result with what it
    shows under "dom" (and keep a screenshot)."""
    session = browser.open_page(f"{BASE}/diag#{fragment}")
    deadline = time.monotonic() + timeout
    done = None
    while time.monotonic() < deadline:
        done = browser.evaluate(
            session, "(document.getElementById('result') || {dataset: {}}).dataset.done || null"
        )
        if done == "1":
            break
        time.sleep(0.5)
    text = browser.evaluate(session, "document.getElementById('result')?.textContent || ''")
    shot = tmp_path / "diag.png"
    browser.screenshot(session, shot)
    if os.environ.get("ACTRIX_DIAG_SCREENSHOT"):
        shutil.copy(shot, os.environ["ACTRIX_DIAG_SCREENSHOT"])
    assert done == "1", f"the page did not finish in {timeout} s; last result:\n{text}\n{browser.output()}"
    r = json.loads(text)
    r["dom"] = json.loads(browser.evaluate(session, DOM_JS))
    return r


class _ConfigScript(HTMLParser):
    """Collects the text of <script id="diag-config">."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.inside = tag == "script" and ("id", "diag-config") in attrs

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.text.append(data)


def page_config(body: bytes) -> dict:
    """The configuration the server embedded in the page."""
    p = _ConfigScript()
    p.feed(body.decode())
    assert p.text, body[:2000]
    return json.loads("".join(p.text))


def candidates(result: dict, policy: str, kind: str) -> list[dict]:
    g = result.get("gather", {}).get(policy) or {}
    return [c for c in g.get("candidates", []) if c.get("type") == kind]


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_diag_page_gathers_and_echoes_through_the_relay(actrix_bin, diag_net, browser, tmp_path):
    app = start_appliance(actrix_bin, tmp_path, diag_net)
    try:
        # The routes themselves: / redirects to the page, which carries this node's URLs.
        status, headers, _ = http_get(diag_net, "/")
        assert status in (302, 303, 307, 308), status
        assert headers.get("location") == "/diag"
        status, headers, body = http_get(diag_net, "/diag")
        assert status == 200
        assert "script-src 'self'" in headers.get("content-security-policy", "")
        assert f"stun:{SERVER_IP}:{STUN_PORT}".encode() in body
        # Only UDP is configured: the page offers only it.
        udp_url = f"turn:{SERVER_IP}:{STUN_PORT}?transport=udp"
        cfg = page_config(body)
        assert cfg["turn"] == {"udp": [udp_url], "tcp": [], "tls": []}, cfg
        assert cfg["listen"] == {"udp": [f"{SERVER_IP}:{STUN_PORT}"], "tcp": [], "tls": []}, cfg
        # Minting is off unless asked for.
        assert http_get(diag_net, "/diag/credential")[0] == 404

        pings = 20
        r = run_page(browser, f"auto=1&user={USER}&pass={PASSWORD}&pings={pings}", tmp_path)
        assert r["done"] and r["errors"] == [], json.dumps(r, indent=2)
        assert r["credential"] == "typed"
        assert r["transport"] == "udp"
        assert r["ice_servers"] == [{"urls": [f"stun:{SERVER_IP}:{STUN_PORT}"]}, {"urls": [udp_url]}]
        dom = r["dom"]
        assert [(o["value"], o["disabled"], o["selected"]) for o in dom["transports"]] == [
            ("udp", False, True), ("tcp", True, False), ("tls", True, False)
        ], dom
        assert dom["listeners"] == [
            ["UDP", f"{SERVER_IP}:{STUN_PORT}"], ["TCP", "not served"], ["TLS", "not served"]
        ], dom
        assert [row[:2] for row in dom["app_urls"]] == [["UDP", udp_url]], dom
        assert f'urls: [\n        "{udp_url}",\n      ],' in dom["snippet"], dom
        assert f'username: "{USER}"' in dom["snippet"], dom
        assert PASSWORD not in json.dumps(dom)

        # Policy "all": the browser's own address as the appliance saw it (srflx); policy
        # "relay": only the appliance's relay address.
        srflx = candidates(r, "all", "srflx")
        assert any(c["address"] == BROWSER_IP for c in srflx), json.dumps(r["gather"], indent=2)
        relay = candidates(r, "relay", "relay")
        assert relay and all(c["address"] == SERVER_IP for c in relay), json.dumps(r["gather"], indent=2)
        assert {c["type"] for c in r["gather"]["relay"]["candidates"]} == {"relay"}
        assert {c["relay_protocol"] for c in relay} == {"udp"}, relay
        assert any(c["address"] == SERVER_IP for c in candidates(r, "all", "relay"))
        assert r["gather"]["all"]["errors"] == [] and r["gather"]["relay"]["errors"] == []

        echo = r["echo"]
        assert echo is not None
        assert len(echo["rtts_ms"]) >= pings - 1, echo
        assert echo["median_ms"] is not None and math.isfinite(echo["median_ms"])
        assert 0 < echo["median_ms"] < 1000, echo
        # The data channel really went through two relayed candidates of this node.
        path = echo["path"]
        assert path and path["local"]["type"] == "relay" and path["remote"]["type"] == "relay", path
        assert path["local"]["address"] == SERVER_IP and path["remote"]["address"] == SERVER_IP
        assert path["local"]["relay_protocol"] == "udp", path

        # The figures the page read from /metrics saw that traffic.
        m = r["metrics"]
        assert "error" not in m, m
        assert m["allocations_created"] >= 2, m
        assert m["relayed_packets"] > 0, m
        assert r["ok"] is True
    finally:
        app.stop(timeout=app.grace + 10)


def test_diag_page_reports_a_wrong_password(actrix_bin, diag_net, browser, tmp_path):
    app = start_appliance(actrix_bin, tmp_path, diag_net)
    try:
        r = run_page(browser, f"auto=1&user={USER}&pass=wrong-password&pings=3", tmp_path)
        assert r["done"] and r["ok"] is False
        assert candidates(r, "relay", "relay") == []
        assert r["echo"] is None
        # STUN needs no credential: the reflexive address is still found.
        assert any(c["address"] == BROWSER_IP for c in candidates(r, "all", "srflx"))
        # The browser reports the 401 (Chromium gives the TURN error code).
        codes = {e.get("code") for e in r["gather"]["relay"]["errors"]}
        assert 401 in codes, r["gather"]["relay"]
        assert r["metrics"]["auth_failures"] >= 1, r["metrics"]
    finally:
        app.stop(timeout=app.grace + 10)


def minting_supported(actrix_bin: str, tmp_path: Path) -> bool:
    cfg = tmp_path / "probe.toml"
    cfg.write_text(
        toml_text({"turn": {"rest_secrets": [REST_SECRET], "diag_credentials": True}})
    )
    r = subprocess.run([actrix_bin, "check", "-c", str(cfg)], capture_output=True, text=True)
    return "diag_credentials" not in (r.stdout + r.stderr)


def test_diag_page_with_a_minted_credential(actrix_bin, diag_net, browser, tmp_path):
    if not minting_supported(actrix_bin, tmp_path):
        pytest.skip("this build has no turn.diag_credentials switch")
    app = start_appliance(
        actrix_bin, tmp_path, diag_net, {"diag_credentials": True, "diag_credential_ttl_secs": 120}
    )
    try:
        status, headers, body = http_get(diag_net, "/diag/credential")
        assert status == 200, body
        assert "no-store" in headers.get("cache-control", "")
        c = json.loads(body)
        expiry, _, name = c["username"].partition(":")
        assert name == "diag" and abs(int(expiry) - (time.time() + 120)) < 10
        want = base64.b64encode(
            hmac.new(REST_SECRET.encode(), c["username"].encode(), hashlib.sha1).digest()
        ).decode()
        assert c["password"] == want and c["ttl"] == 120
        assert f"turn:{SERVER_IP}:{STUN_PORT}?transport=udp" in c["urls"]
        # Another site cannot mint one through the visitor's browser.
        assert http_get(diag_net, "/diag/credential", {"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert http_get(diag_net, "/diag/credential", {"Origin": "https://elsewhere.example"})[0] == 403

        r = run_page(browser, "auto=1&mint=1&pings=5", tmp_path)
        assert r["done"] and r["errors"] == [], json.dumps(r, indent=2)
        assert r["credential"] == "minted"
        assert any(c["address"] == SERVER_IP for c in candidates(r, "relay", "relay"))
        assert len(r["echo"]["rtts_ms"]) >= 4 and r["ok"] is True

        # A reload that rotates the secret: the page mints with the new one at once.
        rotated = "rotated-rest-secret-0123456789"
        app.config["turn"]["rest_secrets"] = [rotated, REST_SECRET]
        app.config_path.write_text(toml_text(app.config))
        app.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            c = json.loads(http_get(diag_net, "/diag/credential")[2])
            mac = hmac.new(rotated.encode(), c["username"].encode(), hashlib.sha1).digest()
            if c["password"] == base64.b64encode(mac).decode():
                break
            assert time.monotonic() < deadline, f"still minting with the old secret:\n{app.stderr()}"
            time.sleep(0.2)
        assert app.alive()
    finally:
        app.stop(timeout=app.grace + 10)


def stream_accepted(app: Appliance) -> dict[str, float]:
    """actrix_stream_accepted_total by transport, summed over shards."""
    m = metrics(app)
    return {t: metric_sum(m, "actrix_stream_accepted_total", transport=t) for t in ("tcp", "tls")}


def test_diag_page_chooses_the_transport_and_relays_over_tcp_and_tls(actrix_bin, diag_net, tmp_path):
    # UDP, TCP on the same port, and TLS with a certificate for TLS_NAME issued by a CA the
    # browser trusts (see chromium.py).
    ca = TestCa(tmp_path / "pki")
    chain, key = ca.issue("turn", [TLS_NAME])
    app = start_appliance(actrix_bin, tmp_path, diag_net, extra_stun={
        "listen_tcp": [f"{SERVER_IP}:{STUN_PORT}"],
        "listen_tls": [f"{SERVER_IP}:{TLS_PORT}"],
        "tls_cert": str(chain),
        "tls_key": str(key),
    })
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Browser(
        need_chromium(), diag_net.browser, profile,
        args=(f"--host-resolver-rules=MAP {TLS_NAME} {SERVER_IP}",),
        home=nss_home(tmp_path / "home", [(ca.cert, "C,,")]),
    )
    urls = {
        "udp": f"turn:{SERVER_IP}:{STUN_PORT}?transport=udp",
        "tcp": f"turn:{SERVER_IP}:{STUN_PORT}?transport=tcp",
        # The name of the certificate, not the address: what a TLS client checks.
        "tls": f"turns:{TLS_NAME}:{TLS_PORT}",
    }
    try:
        status, _, body = http_get(diag_net, "/diag")
        assert status == 200
        cfg = page_config(body)
        assert cfg["turn"] == {t: [u] for t, u in urls.items()}, cfg
        assert cfg["tls_names"] == [TLS_NAME] and cfg["tls_self_signed"] is False, cfg
        listening = {
            "udp": f"{SERVER_IP}:{STUN_PORT}", "tcp": f"{SERVER_IP}:{STUN_PORT}",
            "tls": f"{SERVER_IP}:{TLS_PORT}",
        }
        assert cfg["listen"] == {t: [a] for t, a in listening.items()}, cfg

        for transport in ("tcp", "tls"):
            before = stream_accepted(app)
            r = run_page(
                browser, f"auto=1&user={USER}&pass={PASSWORD}&pings=5&transport={transport}", tmp_path
            )
            dump = json.dumps(r, indent=2)
            assert r["done"] and r["errors"] == [] and r["ok"] is True, dump
            assert r["transport"] == transport
            # Only the chosen transport's URL was given to the browser.
            assert r["ice_servers"] == [
                {"urls": [f"stun:{SERVER_IP}:{STUN_PORT}"]}, {"urls": [urls[transport]]}
            ], dump
            relay = candidates(r, "relay", "relay")
            assert relay and {c["relay_protocol"] for c in relay} == {transport}, dump
            assert all(c["address"] == SERVER_IP for c in relay), dump
            assert r["gather"]["relay"]["errors"] == [], dump
            echo = r["echo"]
            assert len(echo["rtts_ms"]) >= 4, echo
            path = echo["path"]
            assert path["local"]["type"] == "relay" and path["local"]["relay_protocol"] == transport, path
            assert path["remote"]["type"] == "relay", path

            # The appliance served the connections over that transport: the relay gathering
            # and the echo's two peer connections at least, and none over the other one.
            after = stream_accepted(app)
            other = "tls" if transport == "tcp" else "tcp"
            assert after[transport] - before[transport] >= 3, (before, after)
            assert after[other] == before[other], (before, after)
            # The page read that too.
            assert r["metrics"]["stream_accepted_by_transport"][transport] >= 3, r["metrics"]

            # The page lists the three URLs for applications, the TLS one with its name.
            dom = r["dom"]
            assert [(o["value"], o["disabled"]) for o in dom["transports"]] == [
                ("udp", False), ("tcp", False), ("tls", False)
            ], dom
            assert [o["value"] for o in dom["transports"] if o["selected"]] == [transport]
            assert dom["listeners"] == [
                ["UDP", listening["udp"]], ["TCP", listening["tcp"]], ["TLS", listening["tls"]]
            ], dom
            assert [row[:2] for row in dom["app_urls"]] == [
                ["UDP", urls["udp"]], ["TCP", urls["tcp"]], ["TLS", urls["tls"]]
            ], dom
            assert TLS_NAME in dom["app_urls"][2][2] and "self-signed" not in dom["app_urls"][2][2]
            listed = "".join(f'\n        "{u}",' for u in urls.values())
            assert f"urls: [{listed}\n      ]," in dom["snippet"], dom["snippet"]
            assert dom["turn_shown"] == urls[transport]
    finally:
        browser.close()
        app.stop(timeout=app.grace + 10)


def test_diag_page_reports_a_transport_the_node_does_not_serve(actrix_bin, diag_net, browser, tmp_path):
    app = start_appliance(actrix_bin, tmp_path, diag_net)
    try:
        r = run_page(browser, f"auto=1&user={USER}&pass={PASSWORD}&pings=2&transport=tls", tmp_path)
        assert r["done"] and r["ok"] is False
        assert r["errors"] == ["this node serves no TURN over TLS"], r["errors"]
        assert r["echo"] is None
    finally:
        app.stop(timeout=app.grace + 10)
