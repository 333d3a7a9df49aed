"""Lifecycle: `actrix check`, refusing a bad configuration, SIGTERM drain, the embedded
default configuration."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import pytest

import turnwire as tw
from conftest import (
    Appliance,
    base_config,
    client,
    free_port,
    run_uclient,
    write_config,
)


def check(actrix_bin: str, path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [actrix_bin, "check", "-c", str(path)], capture_output=True, text=True, timeout=20
    )


def test_check_accepts_a_good_file(actrix_bin, tmp_path):
    cfg = base_config(tmp_path)
    r = check(actrix_bin, write_config(tmp_path, cfg))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    assert cfg["stun"]["listen"][0] in r.stdout


BAD = """
bogus_top = 1

[node]
data_dir = "{data}"

[log]
level = "loud"

[cores]
pin = false

[stun]
listen = ["127.0.0.1:{port}", "not-an-address"]
whatever = true

[turn]
relay_addresses = ["10.0.0.300"]
relay_port_range = "9000-8000"
allow_peers = ["10.0.0.0/99"]
deny_peers = ["::1-10.0.0.1"]
users = [{{ name = "alice", password = "short" }}]
rest_secrets = ["tiny"]
default_lifetime = 7200
"""

# What each error line must name (the key that holds the bad value).
BAD_KEYS = [
    "bogus_top: unknown key",
    "stun.whatever: unknown key",
    "log.level",
    "stun.listen[1]",
    "turn.relay_addresses[0]",
    "turn.relay_port_range",
    "turn.allow_peers[0]",
    "turn.deny_peers[0]",
    "turn.users[0].password",
    "turn.rest_secrets[0]",
    "turn.default_lifetime",
]


def bad_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(BAD.format(data=tmp_path / "data", port=free_port()))
    return p


def test_check_lists_every_error_at_once(actrix_bin, tmp_path):
    r = check(actrix_bin, bad_file(tmp_path))
    assert r.returncode != 0
    err = r.stderr
    m = re.search(r"configuration has (\d+) error", err)
    assert m, err
    lines = [line for line in err.splitlines() if line.strip().startswith("- ")]
    assert int(m.group(1)) == len(lines) >= len(BAD_KEYS), err
    missing = [k for k in BAD_KEYS if k not in err]
    assert not missing, f"not reported: {missing}\n{err}"


def test_check_unparsable_file_fails(actrix_bin, tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[turn\nrelay_addresses = \n")
    r = check(actrix_bin, p)
    assert r.returncode != 0 and r.stderr.strip()


def test_run_refuses_a_bad_configuration(actrix_bin, tmp_path):
    """T4: fail closed. A bad allow/deny list or any other error: no start, nothing bound."""
    cfg = base_config(tmp_path)
    cfg["turn"]["allow_peers"] = ["10.0.0.0/8", "300.1.2.3/8"]
    path = write_config(tmp_path, cfg)
    r = subprocess.run(
        [actrix_bin, "run", "-c", str(path)], capture_output=True, text=True, timeout=20
    )
    assert r.returncode != 0
    assert "turn.allow_peers[1]" in r.stderr
    assert "actrix ready" not in r.stderr
    port = int(cfg["stun"]["listen"][0].rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # still free


# ------------------------------------------------------------------------------------------
# SIGTERM
# ------------------------------------------------------------------------------------------


def echo_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    return s


def relay_works(c: tw.RawTurnClient, echo: socket.socket, number: int, tag: bytes) -> None:
    c.send_channel(number, tag)
    d, src = echo.recvfrom(2048)
    assert d == tag and src == c.relayed
    echo.sendto(tag + b"-back", src)
    assert c.receive_until(lambda it: it[0] == "chan", 2) == ("chan", number, tag + b"-back")


def wait_stderr(app: Appliance, needle: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in app.stderr():
            return True
        time.sleep(0.02)
    return False


def test_sigterm_drains_existing_allocations_and_refuses_new_ones(appliance_factory):
    grace = 3
    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"], "shutdown_grace_secs": grace}}
    )
    echo = echo_socket()
    with client(app, bind=("127.0.0.40", 0)) as a, client(app, bind=("127.0.0.41", 0)) as b:
        a.allocate()
        assert a.channel_bind(0x4000, echo.getsockname()).cls == tw.SUCCESS
        relay_works(a, echo, 0x4000, b"before")

        t0 = time.monotonic()
        app.signal(signal.SIGTERM)
        assert wait_stderr(app, "shutting down")

        # A new allocation during the drain: 508 Insufficient Capacity (after authentication).
        resp = b.allocate(check=False)
        assert resp.cls == tw.ERROR and resp.error_code() == 508, resp
        assert resp.get(tw.MESSAGE_INTEGRITY) is not None

        # The existing one keeps relaying and can still be refreshed.
        relay_works(a, echo, 0x4000, b"during-drain")
        assert a.refresh(600).cls == tw.SUCCESS
        assert a.create_permission(("127.0.0.1", 9)).cls == tw.SUCCESS

        rc = app.wait(grace + 5)
        elapsed = time.monotonic() - t0
    echo.close()
    assert rc == 0, app.stderr()
    # It waited for the allocation for the whole grace period, and not much longer.
    assert grace - 0.5 <= elapsed <= grace + 5, elapsed
    assert "grace period over" in app.stderr()


def test_sigterm_drain_ends_when_the_last_allocation_is_deleted(appliance_factory):
    app = appliance_factory({"turn": {"shutdown_grace_secs": 30}})
    with client(app) as a:
        a.allocate()
        t0 = time.monotonic()
        app.signal(signal.SIGTERM)
        assert wait_stderr(app, "shutting down")
        time.sleep(0.5)
        assert app.alive(), "exited although an allocation was still draining"
        assert a.refresh(0).cls == tw.SUCCESS
        rc = app.wait(10)
    assert rc == 0, app.stderr()
    assert time.monotonic() - t0 < 5
    assert "all allocations drained" in app.stderr()


def test_sigterm_without_allocations_exits_promptly(appliance_factory):
    app = appliance_factory({"turn": {"shutdown_grace_secs": 30}})
    with client(app) as a:  # traffic, but no allocation
        assert a.request(tw.BINDING).cls == tw.SUCCESS
    t0 = time.monotonic()
    app.signal(signal.SIGTERM)
    rc = app.wait(10)
    assert rc == 0, app.stderr()
    assert time.monotonic() - t0 < 2.5
    assert "actrix stopped" in app.stderr()


def test_second_signal_ends_the_drain(appliance_factory):
    app = appliance_factory({"turn": {"shutdown_grace_secs": 30}})
    with client(app) as a:
        a.allocate()
        t0 = time.monotonic()
        app.signal(signal.SIGTERM)
        assert wait_stderr(app, "shutting down")
        time.sleep(0.3)
        app.signal(signal.SIGINT)
        rc = app.wait(10)
    assert rc == 0, app.stderr()
    assert time.monotonic() - t0 < 5
    assert "second signal" in app.stderr()


# ------------------------------------------------------------------------------------------
# The embedded default configuration
# ------------------------------------------------------------------------------------------


def port_busy(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


DEMO_RE = re.compile(r"demo user\s+demo / (\S+)")
TRY_RE = re.compile(r"try: (turnutils_uclient .*)")


def test_embedded_default_demo_user_relays(actrix_bin, tmp_path, loopback_netns):
    """`actrix run` without -c: loopback only, 127.0.0.1:3478 and :8080, a demo user whose
    printed password works. Run inside a private namespace so the fixed ports are ours."""
    ns = loopback_netns
    if ns is None and (port_busy(socket.SOCK_DGRAM, 3478) or port_busy(socket.SOCK_STREAM, 8080)):
        pytest.skip("no network namespace available and 127.0.0.1:3478/udp or "
                    "127.0.0.1:8080/tcp is busy: the embedded default binds exactly those")
    app = Appliance(actrix_bin, tmp_path, embedded=True, cwd=tmp_path, netns=ns)
    with app:
        deadline = time.monotonic() + 5
        while not DEMO_RE.search(app.stdout()) and time.monotonic() < deadline:
            time.sleep(0.05)
        m = DEMO_RE.search(app.stdout())
        assert m, app.stdout() + app.stderr()
        password = m.group(1)
        assert len(password) >= 16
        assert "udp://127.0.0.1:3478" in app.stdout()
        # Its data directory is relative to the working directory.
        assert (tmp_path / "actrix-data").is_dir()

        # The command it suggests works as printed.
        hint = TRY_RE.search(app.stdout())
        assert hint, app.stdout()
        argv = hint.group(1).split()
        assert argv[0] == "turnutils_uclient" and password in argv, argv
        r, lost = run_uclient(argv[1:], netns=ns)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{argv}: {out[-2000:]}"
        assert lost == 0, out[-2000:]

        # Client to client (-y) with several clients. Send indications (-s): the embedded
        # configuration keeps RFC 8656's channel range, and coturn 4.6's client picks channel
        # numbers up to 0x7FFF.
        r, lost = run_uclient(
            ["-y", "-s", "-u", "demo", "-w", password, "-p", "3478",
             "-n", "30", "-m", "2", "-l", "100", "127.0.0.1"],
            netns=ns,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-2000:]
        assert lost == 0, out[-2000:]

        # Only the printed password works.
        bad, lost_bad = run_uclient(
            ["-y", "-u", "demo", "-w", password[::-1] + "x", "-p", "3478",
             "-n", "3", "-m", "1", "127.0.0.1"],
            timeout=60,
            netns=ns,
        )
        assert bad.returncode != 0 and lost_bad is None

        app.signal(signal.SIGTERM)
        time.sleep(0.1)
        app.signal(signal.SIGTERM)  # uclient leaves an allocation behind: end the drain
        assert app.wait(10) == 0, app.stderr()
