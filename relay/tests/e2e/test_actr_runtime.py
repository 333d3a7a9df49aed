"""The published Actrix runtime's signaling client (actr-runtime 0.1.7's
WebSocketSignalingClient, unchanged) against the running appliance: register, heartbeat,
route candidates, credential refresh, SDP relay, spoof refusal and unregister. The client
program is signaling/compat (built by scripts/test.sh; ACTR_RUNTIME_CLIENT names it).
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
        for step in (
            "registered two actors",
            "heartbeats answered",
            "route candidates found the callee",
            "SDP relayed without the credential",
            "credential refreshed and accepted",
            "spoofed source refused",
            "unregistered callee gone from route candidates",
            "all steps",
        ):
            assert f"ok: {step}" in r.stdout, out
