"""The diagnostics page (GET /diag) driven by a real browser: headless Chromium gathers ICE
candidates against the appliance's STUN and TURN, runs a relayed data-channel echo between two
relay-only peer connections, and reads /metrics.

Chromium gathers no candidates on a host with only loopback, so the appliance and the browser
run in two network namespaces of their own joined by a veth pair (10.213.0.1 and 10.213.0.2,
addresses that exist only there). The browser is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe): no port, no WebSocket client. The page runs by itself with
`#auto=1&user=..&pass=..` and writes its results as JSON into <pre id="result" data-done="1">.
Set ACTRIX_DIAG_SCREENSHOT=PATH to keep a screenshot of the page after the run.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import math
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import PASSWORD, REST_SECRET, USER, Appliance, in_netns, sh, toml_text

SERVER_IP = "10.213.0.1"
BROWSER_IP = "10.213.0.2"
STUN_PORT = 3478
HTTP_PORT = 8080
BASE = f"http://{SERVER_IP}:{HTTP_PORT}"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


# ------------------------------------------------------------------------------------------
# Two namespaces joined by a veth pair
# ------------------------------------------------------------------------------------------


class DiagNet:
    """`server` (10.213.0.1, runs the appliance) and `browser` (10.213.0.2, runs Chromium)."""

    def __init__(self):
        self.server = f"actrix-diag-{os.getpid()}"
        self.browser = f"actrix-diag-{os.getpid()}-b"

    def setup(self) -> "DiagNet":
        s, b = self.server, self.browser
        self.cleanup()
        sh("ip", "netns", "add", s)
        sh("ip", "netns", "add", b)
        for ns in (s, b):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # IPv4 only: keeps the candidate list to what the test looks at.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", s, "link", "add", "dg0", "type", "veth", "peer", "name", "dg1", "netns", b)
        sh("ip", "-n", s, "addr", "add", f"{SERVER_IP}/24", "dev", "dg0")
        sh("ip", "-n", b, "addr", "add", f"{BROWSER_IP}/24", "dev", "dg1")
        sh("ip", "-n", s, "link", "set", "dg0", "up")
        sh("ip", "-n", b, "link", "set", "dg1", "up")
        # A default route, as on any real client (the browser looks for one).
        sh("ip", "-n", b, "route", "add", "default", "via", SERVER_IP)
        return self

    def cleanup(self) -> None:
        for ns in (self.browser, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture
def diag_net(request):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    net = DiagNet()
    request.addfinalizer(net.cleanup)
    try:
        net.setup()
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"cannot create network namespaces with a veth pair here: {e}")
    return net


def appliance_config(extra_turn: dict | None = None) -> dict:
    turn = {
        "relay_addresses": [SERVER_IP],
        "allow_peers": ["10.213.0.0/24"],
        "rest_secrets": [REST_SECRET],
    }
    turn.update(extra_turn or {})
    return {
        "stun": {"listen": [f"{SERVER_IP}:{STUN_PORT}"]},
        "http": {"listen": f"{SERVER_IP}:{HTTP_PORT}"},
        "turn": turn,
    }


def start_appliance(actrix_bin, tmp_path: Path, net: DiagNet, extra_turn=None) -> Appliance:
    d = tmp_path / "appliance"
    d.mkdir(exist_ok=True)
    app = Appliance(actrix_bin, d, appliance_config(extra_turn), netns=net.server)
    app.start()
    status = http_get(net, "/diag")[0]
    if status != 200:
        app.__exit__(None, None, None)
        pytest.fail(
            f"GET /diag answered {status}: this binary does not serve the diagnostics page "
            "(merge actrix::diag::router into the control server in relay/src/main.rs)"
        )
    return app


def http_get(net: DiagNet, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
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


# ------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol on a pipe
# ------------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium in the browser namespace; commands go over fds 3 (in) and 4 (out) as
    NUL-terminated JSON (--remote-debugging-pipe)."""

    def __init__(self, binary: str, netns: str, profile: Path):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        # Move the child's ends above 9 first, so placing them at 3 and 4 cannot clobber one
        # with the other; bash does the placing right before it execs Chromium.
        hi_r = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_r)
        os.close(from_w)
        to_r, from_w = hi_r, hi_w
        place = f'exec 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-; exec "$@"'

        self.log = profile.parent / "chromium.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                "ip", "netns", "exec", netns, "bash", "-c", place, "chromium", binary,
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
                "--mute-audio", "--window-size=1200,900",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(to_r, from_w),
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe:\n{self.output()}")
                self._buf += chunk

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def open_page(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Runtime.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.send("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session: str, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def screenshot(self, session: str, path: Path) -> None:
        r = self.send("Page.captureScreenshot", {"format": "png"}, session=session)
        path.write_bytes(base64.b64decode(r["data"]))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to, self._from):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


@pytest.fixture
def browser(diag_net, tmp_path):
    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/deps.sh does it)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    b = Browser(binary, diag_net.browser, profile)
    yield b
    b.close()


def run_page(browser: Browser, fragment: str, tmp_path: Path, timeout: float = 90) -> dict:
    """Open /diag#fragment, wait for the page to finish, return its result (and keep a
    screenshot)."""
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
    return json.loads(text)


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
        # Minting is off unless asked for.
        assert http_get(diag_net, "/diag/credential")[0] == 404

        pings = 20
        r = run_page(browser, f"auto=1&user={USER}&pass={PASSWORD}&pings={pings}", tmp_path)
        assert r["done"] and r["errors"] == [], json.dumps(r, indent=2)
        assert r["credential"] == "typed"

        # Policy "all": the browser's own address as the appliance saw it (srflx); policy
        # "relay": only the appliance's relay address.
        srflx = candidates(r, "all", "srflx")
        assert any(c["address"] == BROWSER_IP for c in srflx), json.dumps(r["gather"], indent=2)
        relay = candidates(r, "relay", "relay")
        assert relay and all(c["address"] == SERVER_IP for c in relay), json.dumps(r["gather"], indent=2)
        assert {c["type"] for c in r["gather"]["relay"]["candidates"]} == {"relay"}
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
