"""coturn's own test clients against the appliance: STUN Binding and TURN relaying."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

import turnwire as tw
from conftest import (
    PASSWORD,
    REST_SECRET,
    USER,
    client,
    has_ipv6_loopback,
    metric_sum,
    metrics,
    run_uclient,
)

REFLEXIVE_RE = re.compile(r"UDP reflexive addr: (\S+):(\d+)")


def ephemeral_range() -> tuple[int, int]:
    lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
    return int(lo), int(hi)


@pytest.mark.parametrize("local", ["127.0.0.1", "127.0.0.3"])
def test_stunclient_gets_its_reflexive_address(appliance, local):
    r = subprocess.run(
        ["turnutils_stunclient", "-p", str(appliance.port), "-L", local, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    found = REFLEXIVE_RE.findall(r.stdout + r.stderr)
    assert found, r.stdout + r.stderr
    lo, hi = ephemeral_range()
    for ip, port in found:
        # The source address the client really used (the -L address), not a constant.
        assert ip == local
        assert lo <= int(port) <= hi, f"reflexive port {port} is not a kernel-chosen port"


@pytest.mark.skipif(not has_ipv6_loopback(), reason="host has no ::1")
def test_stunclient_ipv6_listener(appliance_factory):
    app = appliance_factory(listen_host="::1")
    r = subprocess.run(
        ["turnutils_stunclient", "-p", str(app.port), "::1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"UDP reflexive addr: \[?([0-9a-f:]+)\]?:(\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert m.group(1) == "::1"


def test_binding_reflexive_address_exact(appliance):
    """Our own Binding from a socket whose port we know: XOR-MAPPED-ADDRESS is exactly it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        req = tw.Msg(tw.BINDING, tw.REQUEST)
        s.sendto(req.encode(fingerprint=True), appliance.addr)
        data, src = s.recvfrom(2048)
        assert src == appliance.addr
        resp = tw.parse(data)
        assert resp is not None and resp.cls == tw.SUCCESS and resp.tid == req.tid
        assert resp.xor_addr(tw.XOR_MAPPED_ADDRESS) == s.getsockname()
        assert tw.verify_fingerprint(data)


# ------------------------------------------------------------------------------------------
# turnutils_uclient: relaying through the appliance
# ------------------------------------------------------------------------------------------

LOAD = ["-n", "100", "-m", "10", "-l", "100"]
TOTALS_RE = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")


def totals(out: str) -> tuple[int, int] | None:
    """The final message counters uclient prints (sent, received)."""
    m = TOTALS_RE.findall(out)
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def assert_all_relayed(out: str) -> None:
    """It did relay: at least 10 clients x 100 messages went out and all came back (-y
    rounds the client count up to whole pairs)."""
    t = totals(out)
    assert t is not None, out[-2000:]
    sent, received = t
    assert sent >= 1000 and received == sent, out[-2000:]


def uclient_args(app, peer_port: int | None, *flags: str, user=USER, password=PASSWORD):
    args = list(flags) + LOAD + ["-p", str(app.port)]
    if user is not None:
        args += ["-u", user]
    if password is not None:
        args += ["-w", password]
    if peer_port is not None:
        args += ["-e", "127.0.0.1", "-r", str(peer_port)]
    return args + ["127.0.0.1"]


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="channels"),
        pytest.param(["-s"], id="send-indications"),
        pytest.param(["-c"], id="no-rtcp"),
        pytest.param(["-s", "-c"], id="send-no-rtcp"),
    ],
)
def test_uclient_relays_to_peer_without_loss(appliance, turnutils_peer, flags):
    peer = turnutils_peer()
    r, lost = run_uclient(uclient_args(appliance, peer, *flags))
    check_relayed(r, lost)


def check_relayed(r, lost):
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert lost == 0, out[-3000:]
    assert_all_relayed(out)


def test_uclient_channels_with_the_mmsg_backend(appliance_factory, turnutils_peer):
    """The same channel relay test with the recvmmsg/sendmmsg I/O backend."""
    app = appliance_factory({"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": "mmsg"}})
    peer = turnutils_peer()
    r, lost = run_uclient(uclient_args(app, peer))
    check_relayed(r, lost)
    assert 'backend="io_uring"' not in app.stderr()


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="channels"),
        pytest.param(["-s"], id="send-indications"),
        pytest.param(["-y"], id="client-to-client"),
        pytest.param(["-y", "-s", "-c"], id="client-to-client-send-no-rtcp"),
    ],
)
@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_uclient_relays_over_tcp(appliance_factory, turnutils_peer, flags, backend):
    """coturn's client over TCP (-t): STUN and TURN on a stream, relayed over UDP."""
    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": backend}}, tcp=True
    )
    peer = None if "-y" in flags else turnutils_peer()
    r, lost = run_uclient(uclient_args(app, peer, "-t", *flags))
    check_relayed(r, lost)
    # It really went over TCP: the appliance counted the connections.
    m = metrics(app)
    assert m["actrix_stream_accepted_total"] >= 10, m


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="channels"),
        pytest.param(["-s"], id="send-indications"),
        pytest.param(["-c"], id="no-rtcp"),
    ],
)
@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_uclient_relays_over_tls(appliance_factory, turnutils_peer, flags, backend):
    """coturn's client over TLS (-t -S, OpenSSL): TURN on a TLS stream, relayed over UDP."""
    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": backend}}, tls=True
    )
    peer = turnutils_peer()
    args = uclient_args(app, peer, "-t", "-S", *flags)
    args[args.index("-p") + 1] = str(app.tls_port)
    r, lost = run_uclient(args)
    check_relayed(r, lost)
    m = metrics(app)
    assert metric_sum(m, "actrix_stream_accepted_total", transport="tls") >= 10, m
    assert metric_sum(m, "actrix_stream_accepted_total", transport="tcp") == 0, m


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="channels"),
        pytest.param(["-s"], id="send-indications"),
        pytest.param(["-y"], id="client-to-client"),
    ],
)
@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_uclient_relays_over_dtls(appliance_factory, turnutils_peer, flags, backend):
    """coturn's client over DTLS (-S without -t, OpenSSL): TURN in DTLS records on UDP,
    relayed to coturn's peer or between its own clients, nothing lost."""
    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": backend}}, dtls=True
    )
    peer = None if "-y" in flags else turnutils_peer()
    args = uclient_args(app, peer, "-S", *flags)
    args[args.index("-p") + 1] = str(app.dtls_port)
    r, lost = run_uclient(args)
    check_relayed(r, lost)
    # It really went over DTLS: every client an association with a finished handshake.
    m = metrics(app)
    assert metric_sum(m, "actrix_dtls_handshakes_total", result="completed") >= 10, m
    assert metric_sum(m, "actrix_stream_accepted_total", transport="dtls") >= 10, m
    assert metric_sum(m, "actrix_dtls_hello_verify_total") >= 10, m
    assert metric_sum(m, "actrix_stream_accepted_total", transport="tls") == 0, m


def test_uclient_over_dtls_on_two_shards(appliance_factory):
    """DTLS associations spread over two shards (the DTLS sockets form their own steered
    SO_REUSEPORT group): every client keeps landing on the shard that holds its association,
    so client-to-client relaying loses nothing, and no handshake fails."""
    app = appliance_factory(
        {
            "turn": {"allow_peers": ["127.0.0.0/8"]},
            "cores": {"pin": False, "shards": [0, 1]},
        },
        dtls=True,
    )
    # -c: no RTCP allocations. With them (EVEN-PORT pairs) uclient gets 508 on two shards with
    # the default steering by address and port, over plain UDP as well (see
    # test_uclient_rtcp_pairs_on_two_shards_with_ip_steering for io.steering = "cbpf_ip").
    args = uclient_args(app, None, "-S", "-y", "-c")
    args[args.index("-p") + 1] = str(app.dtls_port)
    r, lost = run_uclient(args)
    check_relayed(r, lost)
    m = metrics(app)
    assert metric_sum(m, "actrix_dtls_handshakes_total", result="completed") >= 10, m
    assert metric_sum(m, "actrix_dtls_handshakes_total", result="failed") == 0, m
    for shard in ("0", "1"):
        done = metric_sum(m, "actrix_dtls_handshakes_total", result="completed", shard=shard)
        assert done >= 1, m


@pytest.mark.parametrize("secure", [pytest.param(False, id="tcp"), pytest.param(True, id="tls")])
@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_uclient_tcp_relay_rfc6062(appliance_factory, backend, secure):
    """RFC 6062 with coturn's client (-T: TCP allocations, client to client through Connect,
    ConnectionAttempt and ConnectionBind), over TCP or TLS, on two shards so that data
    connections also reach the shard that does not own their allocation."""
    app = appliance_factory(
        {
            "turn": {"allow_peers": ["127.0.0.0/8"]},
            "io": {"backend": backend},
            "cores": {"pin": False, "shards": [0, 1]},
            "stun": {"max_connections_per_ip": 1000},
        },
        tcp=True,
        tls=secure,
    )
    args = uclient_args(app, None, "-T", *(["-S"] if secure else []))
    if secure:
        args[args.index("-p") + 1] = str(app.tls_port)
    r, lost = run_uclient(args)
    check_relayed(r, lost)
    # It really went through TCP allocations: every message both ways, byte for byte, and
    # a ConnectionBind per data connection (two per pair of clients).
    m = metrics(app)
    assert metric_sum(m, "actrix_tcp_allocations_created_total") >= 10, m
    assert metric_sum(m, "actrix_tcp_connection_binds_total") >= 10, m
    assert metric_sum(m, "actrix_tcp_relayed_bytes_total", direction="to_peer") >= 100_000, m
    assert metric_sum(m, "actrix_tcp_relayed_bytes_total", direction="to_client") >= 100_000, m
    assert metric_sum(m, "actrix_tcp_connections_moved_total", direction="out") == metric_sum(
        m, "actrix_tcp_connections_moved_total", direction="in"
    )


def glommio_appliance(appliance_factory, **turn):
    """The appliance with its shards on glommio executors (io.backend = "glommio")."""
    app = appliance_factory({"turn": turn, "io": {"backend": "glommio"}})
    return app


def assert_on_glommio(app):
    err = app.stderr()
    assert 'backend="glommio"' in err, err[-3000:]
    assert "glommio unavailable" not in err, err[-3000:]


@pytest.mark.parametrize(
    "flags",
    [pytest.param([], id="channels"), pytest.param(["-s"], id="send-indications")],
)
def test_uclient_relays_through_the_glommio_backend(appliance_factory, turnutils_peer, flags):
    """coturn's client and peer through a shard that runs on a glommio executor."""
    app = glommio_appliance(appliance_factory, allow_peers=["127.0.0.0/8"])
    peer = turnutils_peer()
    r, lost = run_uclient(uclient_args(app, peer, *flags))
    check_relayed(r, lost)
    assert_on_glommio(app)


def test_uclient_client_to_client_through_the_glommio_backend(appliance_factory):
    """-y: coturn's clients relay to each other's relayed addresses, glommio backend."""
    app = glommio_appliance(appliance_factory)
    r, lost = run_uclient(uclient_args(app, None, "-y"))
    check_relayed(r, lost)
    assert_on_glommio(app)


def shared_relay_appliance(appliance_factory, **turn):
    """The appliance with shared relay sockets on 127.0.0.2 (the steering program takes the
    relay ports of that address; the clients and peers stay on 127.0.0.1)."""
    if os.geteuid() != 0:
        pytest.skip("shared relay sockets need root")
    return appliance_factory(
        {"turn": {"relay_addresses": ["127.0.0.2"], **turn}, "io": {"relay_sockets": "shared"}}
    )


@pytest.mark.parametrize(
    "flags",
    [pytest.param([], id="channels"), pytest.param(["-s"], id="send-indications")],
)
def test_uclient_relays_through_shared_relay_sockets(appliance_factory, turnutils_peer, flags):
    """coturn's client and peer through the shared relay sockets (sk_lookup + raw sends)."""
    app = shared_relay_appliance(appliance_factory, allow_peers=["127.0.0.0/8"])
    peer = turnutils_peer()
    r, lost = run_uclient(uclient_args(app, peer, *flags))
    check_relayed(r, lost)
    assert "shared relay sockets steered" in app.stderr()


def test_uclient_client_to_client_through_shared_relay_sockets(appliance_factory):
    """-y: each client's datagrams reach the other's relayed address on the shared socket."""
    app = shared_relay_appliance(appliance_factory)
    r, lost = run_uclient(uclient_args(app, None, "-y"))
    check_relayed(r, lost)


def test_uclient_client_to_client_under_default_policy(appliance_factory):
    """-y: pairs of clients relay to each other's relay addresses. No allow_peers: a relay
    address currently allocated on this appliance is a valid peer by default."""
    app = appliance_factory()
    assert "allow_peers" not in app.config["turn"]
    r, lost = run_uclient(uclient_args(app, None, "-y"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert lost == 0, out[-3000:]
    assert_all_relayed(out)


def test_uclient_client_to_client_send_indications(appliance_factory):
    app = appliance_factory()
    r, lost = run_uclient(uclient_args(app, None, "-y", "-s", "-c"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert lost == 0, out[-3000:]
    assert_all_relayed(out)


def test_uclient_rest_credentials(appliance, turnutils_peer):
    peer = turnutils_peer()
    args = uclient_args(appliance, peer, "-W", REST_SECRET, user="rest-user", password=None)
    r, lost = run_uclient(args)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert lost == 0, out[-3000:]
    assert_all_relayed(out)


def test_uclient_wrong_rest_secret_fails(appliance, turnutils_peer):
    peer = turnutils_peer()
    args = uclient_args(
        appliance, peer, "-W", "not-the-secret-at-all", user="rest-user", password=None
    )
    args[args.index("-n") + 1] = "5"
    args[args.index("-m") + 1] = "1"
    r, lost = run_uclient(args, timeout=60)
    assert r.returncode != 0
    assert lost is None, "no relaying may happen with a wrong REST secret"


def test_uclient_wrong_password_fails(appliance, turnutils_peer):
    peer = turnutils_peer()
    args = uclient_args(appliance, peer, password="wrong-password")
    args[args.index("-n") + 1] = "5"
    args[args.index("-m") + 1] = "1"
    r, lost = run_uclient(args, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert lost is None, out[-2000:]
    assert "Cannot complete Allocation" in out, out[-2000:]


def test_wrong_password_and_unknown_user_get_the_same_401(appliance):
    """A3: 401 with REALM and a fresh NONCE for both; never an allocation."""
    answers = []
    for user, pw in ((USER, "wrong-password"), ("nobody-here", "whatever-pass")):
        with client(appliance, user, pw) as c:
            resp = c.allocate(check=False)
            assert resp.cls == tw.ERROR and resp.error_code() == 401, resp
            assert resp.get(tw.REALM) == b"actor-rtc.local"
            assert resp.get(tw.NONCE)
            assert resp.get(tw.XOR_RELAYED_ADDRESS) is None
            answers.append(sorted(t for t, _ in resp.attrs))
    assert answers[0] == answers[1]
    with client(appliance) as c:
        ok = c.allocate()
        assert ok.cls == tw.SUCCESS and c.relayed[0] == "127.0.0.1"


def test_uclient_rtcp_pairs_on_two_shards_with_ip_steering(appliance_factory):
    """uclient's default RTCP mode (-y without -c): each client allocates an RTP port with
    EVEN-PORT (R bit) and an RTCP port with the RESERVATION-TOKEN from a second local port.
    With `io.steering = "cbpf_ip"` both ports of one client address land on the shard that
    holds the reservation, so no Allocate is refused on two shards; clients from two
    addresses land on two different shards (0x7f000001 mod 2 = 1, 0x7f000002 mod 2 = 0)."""
    app = appliance_factory(
        {
            "turn": {"allow_peers": ["127.0.0.0/8"]},
            "cores": {"pin": False, "shards": [0, 1]},
            "io": {"steering": "cbpf_ip"},
        }
    )
    for local, shard, other in (("127.0.0.1", "1", "0"), ("127.0.0.2", "0", "1")):
        m = metrics(app)
        before = metric_sum(m, "actrix_packets_received_total", shard=shard, side="client")
        others = metric_sum(m, "actrix_packets_received_total", shard=other, side="client")
        r, lost = run_uclient(uclient_args(app, None, "-y", "-L", local))
        check_relayed(r, lost)
        m = metrics(app)
        assert metric_sum(m, "actrix_allocations_refused_total") == 0, m
        after = metric_sum(m, "actrix_packets_received_total", shard=shard, side="client")
        assert after - before >= 1000, (local, shard, m)
        # Every datagram of that client address went to its one shard.
        assert metric_sum(m, "actrix_packets_received_total", shard=other, side="client") == others
    assert metric_sum(m, "actrix_allocations_created_total") >= 20, m
