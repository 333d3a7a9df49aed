"""WebRTC through the appliance's TURN over TCP and TLS, in a real browser.

Headless Chromium (network namespaces: see chromium.py) makes two relay-only peer connections
(iceTransportPolicy "relay") whose only ICE server is `turn:HOST:PORT?transport=tcp`, or
`turns:NAME:PORT` (TCP implied), opens a data channel between them and echoes messages over
it. The tests check that the channel opened and every message came back, that both sides'
selected candidates are relayed candidates of this node whose relay protocol (getStats'
`relayProtocol`) is the transport asked for, and that the appliance really served them that
way (`actrix_stream_accepted_total{transport=...}` grew, the other transport's did not).

TLS is verified as browsers do in production, nothing switched off: the browser's NSS
database trusts a CA the test made with openssl (which issued the appliance's certificate for
a host name the browser maps to the server with --host-resolver-rules), or trusts the
appliance's own `actrix cert --self-signed` certificate as a peer. A browser that does not
trust the certificate, or reaches it under a name it was not made for, gets no relayed
candidate.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from chromium import SERVER_IP, Browser, BrowserNet, TestCa, browser_net, need_chromium, nss_home
from conftest import PASSWORD, USER, Appliance, metric_sum, metrics

STUN_PORT = 3478
TLS_PORT = 5349
HTTP_PORT = 8080
# Names under .test (RFC 2606): they exist only in the browser's --host-resolver-rules.
TLS_NAME = "turn.actrix.test"
OTHER_NAME = "other.actrix.test"
RESOLVE = f"--host-resolver-rules=MAP {TLS_NAME} {SERVER_IP}, MAP {OTHER_NAME} {SERVER_IP}"
MESSAGES = 20

# Two relay-only peer connections in about:blank, candidates trickled across in the page; A
# sends MESSAGES numbered messages on an ordered, reliable channel and B echoes each. The
# result: whether the channel opened, the echoes A got back, the ICE errors, every local
# candidate of both sides and their selected pairs' local candidates (from getStats). When
# both sides finish gathering without a candidate, the channel cannot open: it stops there.
ECHO_JS = """
(async (iceServers, messages) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const conf = { iceServers, iceTransportPolicy: 'relay' };
  const a = new RTCPeerConnection(conf);
  const b = new RTCPeerConnection(conf);
  const out = { opened: false, echoes: [], errors: [], candidates: { a: [], b: [] }, selected: {}, state: null };
  for (const [name, pc, other] of [['a', a, b], ['b', b, a]]) {
    pc.onicecandidate = (e) => { if (e.candidate) other.addIceCandidate(e.candidate).catch(() => {}); };
    pc.onicecandidateerror = (e) => out.errors.push({ pc: name, url: e.url, code: e.errorCode, text: e.errorText });
  }
  b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send(m.data); };
  const dc = a.createDataChannel('echo');
  const opened = new Promise((resolve) => { dc.onopen = () => resolve(true); });
  let gathered = 0;
  const hopeless = Promise.all([a, b].map((pc) => new Promise((resolve) => {
    pc.addEventListener('icecandidate', (e) => { if (e.candidate && e.candidate.candidate) gathered += 1; else if (!e.candidate) resolve(); });
  }))).then(() => (gathered === 0 ? false : new Promise(() => {})));
  const done = new Promise((resolve) => {
    dc.onmessage = (m) => { out.echoes.push(m.data); if (out.echoes.length === messages) resolve(); };
  });
  try {
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    out.opened = await Promise.race([opened, hopeless, sleep(20000).then(() => false)]);
    if (out.opened) {
      for (let i = 0; i < messages; i++) dc.send(`message ${i}`);
      await Promise.race([done, sleep(10000)]);
    }
    for (const [name, pc] of [['a', a], ['b', b]]) {
      const stats = await pc.getStats();
      const cand = (c) => c && ({ type: c.candidateType, address: c.address || c.ip, port: c.port,
                                  protocol: c.protocol, relay_protocol: c.relayProtocol || null, url: c.url || null });
      stats.forEach((s) => {
        if (s.type === 'local-candidate') out.candidates[name].push(cand(s));
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          out.selected[name] = pair ? cand(stats.get(pair.localCandidateId)) : null;
        }
      });
    }
    out.state = a.iceConnectionState;
  } finally {
    a.close();
    b.close();
  }
  return JSON.stringify(out);
})
"""


@pytest.fixture
def net(request) -> BrowserNet:
    return browser_net(request, "streams")


def start(actrix_bin: str, tmp_path: Path, net: BrowserNet, stun: dict) -> Appliance:
    """The appliance in the server namespace: UDP as always, plus the stream listeners of
    `stun`; peers (the relay addresses themselves) allowed in the test subnet."""
    d = tmp_path / "appliance"
    d.mkdir()
    cfg = {
        "stun": {"listen": [f"{SERVER_IP}:{STUN_PORT}"], **stun},
        "http": {"listen": f"{SERVER_IP}:{HTTP_PORT}"},
        "turn": {"relay_addresses": [SERVER_IP], "allow_peers": ["10.213.0.0/24"]},
    }
    return Appliance(actrix_bin, d, cfg, netns=net.server).start()


def stream_counters(app: Appliance) -> dict[str, float]:
    """The appliance's stream figures, summed over shards: accepted connections and open
    ones per transport, and TLS connections closed for a failed handshake."""
    m = metrics(app)
    out = {}
    for t in ("tcp", "tls"):
        out[f"accepted_{t}"] = metric_sum(m, "actrix_stream_accepted_total", transport=t)
        out[f"open_{t}"] = metric_sum(m, "actrix_stream_connections", transport=t)
    out["tls_errors"] = metric_sum(m, "actrix_stream_closed_total", transport="tls", reason="tls_error")
    return out


def tls_failures_after(app: Appliance, before: dict, at_least: int) -> float:
    """Wait (5 s at most) until the appliance has closed `at_least` more TLS connections for
    a failed handshake than in `before`; returns how many it did."""
    deadline = time.monotonic() + 5
    while True:
        grew = stream_counters(app)["tls_errors"] - before["tls_errors"]
        if grew >= at_least or time.monotonic() > deadline:
            return grew
        time.sleep(0.1)


def wait_no_open_streams(app: Appliance, transport: str) -> None:
    """Connections end with the browser: the appliance keeps none of `transport` open (10 s
    at most)."""
    deadline = time.monotonic() + 10
    while stream_counters(app)[f"open_{transport}"] != 0:
        assert time.monotonic() < deadline, stream_counters(app)
        time.sleep(0.2)


def open_browser(net: BrowserNet, tmp_path: Path, name: str, home: Path | None = None) -> Browser:
    profile = tmp_path / name
    profile.mkdir()
    return Browser(need_chromium(), net.browser, profile, args=(RESOLVE,), home=home)


def echo(browser: Browser, url: str) -> dict:
    """Run ECHO_JS in a fresh about:blank with `url` as the only ICE server."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    servers = [{"urls": [url], "username": USER, "credential": PASSWORD}]
    expr = f"({ECHO_JS})({json.dumps(servers)}, {MESSAGES})"
    try:
        text = browser.evaluate(session, expr, await_promise=True, timeout=60)
    finally:
        browser.send("Target.closeTarget", {"targetId": target})
    return json.loads(text)


def assert_relayed_over(r: dict, url: str, transport: str) -> None:
    """The data channel opened, every message came back, and both sides used a relayed
    candidate of this node reached over `transport` through `url`."""
    dump = json.dumps(r, indent=2)
    assert r["opened"] is True, f"the data channel did not open:\n{dump}"
    assert r["echoes"] == [f"message {i}" for i in range(MESSAGES)], dump
    assert r["errors"] == [], dump
    for side in ("a", "b"):
        sel = r["selected"].get(side)
        assert sel is not None, dump
        assert sel["type"] == "relay" and sel["address"] == SERVER_IP, dump
        # The relayed candidate is UDP toward the peer, reached over `transport`.
        assert sel["protocol"] == "udp" and sel["relay_protocol"] == transport, dump
        assert r["candidates"][side], dump
        for c in r["candidates"][side]:
            assert c["type"] == "relay" and c["relay_protocol"] == transport, dump
    # Chromium reports the URL normalised: turns: with its implied ?transport=tcp.
    want = url if "?" in url else f"{url}?transport=tcp"
    assert {c["url"] for side in ("a", "b") for c in r["candidates"][side]} == {want}, dump


def assert_accepted(before: dict, after: dict, transport: str, app: Appliance) -> None:
    """The appliance accepted connections over `transport` (one per peer connection at
    least), and none over the other stream transport."""
    other = "tls" if transport == "tcp" else "tcp"
    grew = after[f"accepted_{transport}"] - before[f"accepted_{transport}"]
    assert grew >= 2, (before, after, app.stderr())
    assert after[f"accepted_{other}"] == before[f"accepted_{other}"], (before, after)


def test_data_channel_through_turn_over_tcp(actrix_bin, net, tmp_path):
    app = start(actrix_bin, tmp_path, net, {"listen_tcp": [f"{SERVER_IP}:{STUN_PORT}"]})
    browser = open_browser(net, tmp_path, "chromium")
    try:
        url = f"turn:{SERVER_IP}:{STUN_PORT}?transport=tcp"
        before = stream_counters(app)
        r = echo(browser, url)
        assert_relayed_over(r, url, "tcp")
        assert_accepted(before, stream_counters(app), "tcp", app)
        browser.close()
        wait_no_open_streams(app, "tcp")
    finally:
        browser.close()
        app.stop(timeout=app.grace + 10)
    assert app.returncode == 0, app.stderr()


def test_data_channel_through_turns_with_a_certificate_from_a_trusted_ca(actrix_bin, net, tmp_path):
    ca = TestCa(tmp_path / "pki")
    chain, key = ca.issue("turn", [TLS_NAME])
    app = start(actrix_bin, tmp_path, net, {
        "listen_tls": [f"{SERVER_IP}:{TLS_PORT}"], "tls_cert": str(chain), "tls_key": str(key),
    })
    # The browser trusts the CA, nothing else: the appliance's chain is verified up to it.
    browser = open_browser(net, tmp_path, "chromium", nss_home(tmp_path / "home", [(ca.cert, "C,,")]))
    try:
        url = f"turns:{TLS_NAME}:{TLS_PORT}"
        before = stream_counters(app)
        r = echo(browser, url)
        assert_relayed_over(r, url, "tls")
        after = stream_counters(app)
        assert_accepted(before, after, "tls", app)

        # The same server under a name its certificate was not made for: the browser refuses
        # the handshake, so no relayed candidate, and the appliance sees the TLS failure.
        r = echo(browser, f"turns:{OTHER_NAME}:{TLS_PORT}")
        assert r["opened"] is False and r["candidates"] == {"a": [], "b": []}, json.dumps(r, indent=2)
        assert r["errors"] and {e["code"] for e in r["errors"]} == {701}, r["errors"]
        assert tls_failures_after(app, after, 2) >= 2, (after, stream_counters(app), app.stderr())
    finally:
        browser.close()
        app.stop(timeout=app.grace + 10)
    assert app.returncode == 0, app.stderr()


def test_data_channel_through_turns_with_the_appliances_self_signed_certificate(actrix_bin, net, tmp_path):
    cert, key = tmp_path / "turn-cert.pem", tmp_path / "turn-key.pem"
    made = subprocess.run(
        [actrix_bin, "cert", "--self-signed", "--name", TLS_NAME, "--cert", str(cert), "--key", str(key)],
        capture_output=True, text=True, timeout=30,
    )
    assert made.returncode == 0, made.stderr
    assert "SELF-SIGNED" in made.stdout, made.stdout
    app = start(actrix_bin, tmp_path, net, {
        "listen_tls": [f"{SERVER_IP}:{TLS_PORT}"], "tls_cert": str(cert), "tls_key": str(key),
    })
    url = f"turns:{TLS_NAME}:{TLS_PORT}"
    try:
        # A browser that was not told to trust it refuses it, as browsers do.
        plain = open_browser(net, tmp_path, "untrusting")
        try:
            before = stream_counters(app)
            r = echo(plain, url)
        finally:
            plain.close()
        assert r["opened"] is False and r["candidates"] == {"a": [], "b": []}, json.dumps(r, indent=2)
        assert {e["code"] for e in r["errors"]} == {701}, r["errors"]
        assert tls_failures_after(app, before, 2) >= 2, (before, stream_counters(app), app.stderr())

        # Trusted as a peer certificate (NSS "P,,": this certificate, for its own names).
        home = nss_home(tmp_path / "home", [(cert, "P,,")])
        trusting = open_browser(net, tmp_path, "trusting", home)
        try:
            before = stream_counters(app)
            r = echo(trusting, url)
            assert_relayed_over(r, url, "tls")
            assert_accepted(before, stream_counters(app), "tls", app)
        finally:
            trusting.close()
        wait_no_open_streams(app, "tls")
    finally:
        app.stop(timeout=app.grace + 10)
    assert app.returncode == 0, app.stderr()
