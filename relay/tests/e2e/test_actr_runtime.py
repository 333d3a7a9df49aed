"""The published Actrix runtime's clients, unchanged, against the running appliance.

- actr-runtime 0.1.7's WebSocketSignalingClient: register, heartbeat, route candidates,
  credential refresh, SDP relay, spoof refusal and unregister. The client program is
  signaling/compat (built by scripts/test.sh; ACTR_RUNTIME_CLIENT names it).
- actr 0.4.21's client stack (actr-hyper 0.4.21 around actr-runtime 0.4.21: AisClient,
  WebSocketSignalingClient, webrtc-rs's TURN client): AIS registration, Ed25519 credentials,
  heartbeat, discovery, route candidates, signing key, SDP/ICE relay, renewal with a replayed
  token refused, a forged credential refused, TURN relay with the turn_credential, unregister.
  The program is signaling/compat04 (ACTR04_CLIENT names it), run at the same time as the
  0.1.7 client on the same node.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import time
import urllib.request
import uuid

import pytest

from conftest import REPO, Appliance

CLIENT = REPO / "signaling" / "compat" / "target" / "debug" / "actr-runtime-client"
CLIENT04 = REPO / "signaling" / "compat04" / "target" / "debug" / "actr04-client"
STEPS_017 = (
    "registered two actors",
    "heartbeats answered",
    "route candidates found the callee",
    "SDP relayed without the credential",
    "credential refreshed and accepted",
    "spoofed source refused",
    "unregistered callee gone from route candidates",
    "all steps",
)
STEPS_04 = (
    "registered two actors with the AIS",
    "signaling connected with the Ed25519 credential",
    "heartbeats answered",
    "discovery lists the 0.4 callee only",
    "route candidates found the 0.4 callee",
    "signing key fetched over signaling",
    "SDP and ICE relayed without the credential",
    "credential renewed, replayed renewal token refused",
    "forged credential refused",
    "TURN data relayed with the turn_credentials",
    "unregistered callee gone from route candidates",
    "all steps",
)


def client_path(env: str, default, build: str) -> str:
    client = os.environ.get(env) or str(default)
    if not os.access(client, os.X_OK):
        pytest.fail(f"{client} is missing: `{build}` (scripts/test.sh does) or set {env}")
    return client


def put_realm(http_port: int, shared_key: str, realm_id: int) -> None:
    """PUT /ais/realms/{id}, signed with the shared key as the wire reference says."""
    body = json.dumps({"name": "runtime-compat", "status": "Normal"}).encode()
    ts = str(int(time.time()))
    nonce = str(uuid.uuid4())
    payload = f"ais_put_realm:{realm_id}:{hashlib.sha256(body).hexdigest()}"
    sig = hmac.new(shared_key.encode(), (ts + nonce + payload).encode(), hashlib.sha256)
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/ais/realms/{realm_id}",
        data=body,
        method="PUT",
        headers={
            "content-type": "application/json",
            "x-actrix-timestamp": ts,
            "x-actrix-nonce": nonce,
            "x-actrix-signature": base64.b64encode(sig.digest()).decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
        assert r.status == 200 and '"error"' not in text, text


def test_actr_runtime_0_1_7_signaling_client(actrix_bin, tmp_path):
    client = os.environ.get("ACTR_RUNTIME_CLIENT") or str(CLIENT)
    if not os.access(client, os.X_OK):
        pytest.fail(
            f"{client} is missing: `cargo build --manifest-path signaling/compat/Cargo.toml` "
            "(scripts/test.sh does) or set ACTR_RUNTIME_CLIENT"
        )
    with Appliance(actrix_bin, tmp_path) as app:
        key = (tmp_path / "data" / "shared_key").read_text().strip()
        put_realm(app.http_port, key, 4242)
        r = subprocess.run(
            [client, f"ws://127.0.0.1:{app.http_port}/signaling/ws", "4242"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        for step in STEPS_017:
            assert f"ok: {step}" in r.stdout, out


def test_actr_0_4_and_0_1_7_clients_on_one_node_at_once(actrix_bin, tmp_path):
    """Both published client stacks against one appliance at the same time, in one realm:
    each completes every step, and neither sees the other's actors (the 0.4 client checks
    that discovery and route candidates list its own callee only, although a 0.1.7 callee of
    the same type is registered)."""
    c017 = client_path(
        "ACTR_RUNTIME_CLIENT", CLIENT, "cargo build --manifest-path signaling/compat/Cargo.toml"
    )
    c04 = client_path(
        "ACTR04_CLIENT", CLIENT04, "cargo build --manifest-path signaling/compat04/Cargo.toml"
    )
    with Appliance(actrix_bin, tmp_path) as app:
        key = (tmp_path / "data" / "shared_key").read_text().strip()
        put_realm(app.http_port, key, 4242)
        http = f"http://127.0.0.1:{app.http_port}"
        ws = f"ws://127.0.0.1:{app.http_port}/signaling/ws"
        p017 = subprocess.Popen(
            [c017, ws, "4242"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        p04 = subprocess.Popen(
            [c04, http, ws, "4242", f"{app.host}:{app.port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        results = {}
        for name, p in (("0.1.7", p017), ("0.4", p04)):
            try:
                out, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            results[name] = (p.returncode, out, err)
        for name, steps in (("0.1.7", STEPS_017), ("0.4", STEPS_04)):
            rc, out, err = results[name]
            assert rc == 0, f"{name} client failed:\n{out}\n{err}"
            for step in steps:
                assert f"ok: {step}" in out, f"{name}: {out}\n{err}"
        # TURN authenticated the 0.4 clients with the REST secret alone: no identity lookup.
        metrics = urllib.request.urlopen(f"{http}/metrics", timeout=5).read().decode()
        lookups = [
            line
            for line in metrics.splitlines()
            if line.startswith(("actrix_identity_resolutions", "actrix_identity_decryptions"))
        ]
        assert lookups, metrics
        for line in lookups:
            assert float(line.rsplit(" ", 1)[1]) == 0, lookups
