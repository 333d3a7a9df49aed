"""Peer-address policy (SSRF) through a real client: checklist 7.2 T1, T2, P11, T13, T18.

The deny test runs the appliance and the client inside a private network namespace whose only
way out is one veth end (d0) with default routes: any datagram the relay sent toward a
forbidden non-local target would be counted in d0's tx_packets, and any toward a local one
(loopback, 0.0.0.0, ::) would land in catch-all sink sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

import turnwire as tw
from conftest import EgressNamespace, client, free_port, has_ipv6_loopback, in_netns

ALLOWED_V4 = ("198.51.100.7", 5000)
ALLOWED_V6 = ("2001:db8:77::7", 5000)


def deny_peers(vectors) -> tuple[list[str], list[str]]:
    peers = [
        b["peer"] for name, b in vectors.items() if name.startswith("turn-createpermission-deny-")
    ]
    v4 = [p for p in peers if ipaddress.ip_address(p).version == 4]
    v6 = [p for p in peers if ipaddress.ip_address(p).version == 6]
    return v4, v6


def test_vector_list_is_complete(vectors):
    v4, v6 = deny_peers(vectors)
    # The list the checklist names: loopback, 0/8, ::, ::1, mapped, compatible, NAT64, 6to4,
    # Teredo, link-local, ULA, RFC 1918, CGNAT, multicast, broadcast, 240/4, ...
    assert len(v4) >= 14 and len(v6) >= 13, (v4, v6)
    for must in ("127.0.0.1", "0.0.0.0", "169.254.169.254", "10.0.0.1", "255.255.255.255"):
        assert must in v4
    for must in ("::1", "::", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1"):
        assert must in v6


def drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    got = []
    sock.setblocking(False)
    while True:
        try:
            got.append(sock.recvfrom(65535))
        except BlockingIOError:
            return got


def expect_code(resp: tw.Msg, code: int, what: str) -> None:
    assert resp.cls == tw.ERROR and resp.error_code() == code, f"{what}: {resp!r}"


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_deny_vectors_get_403_and_nothing_leaves(appliance_factory, egress_netns, vectors, family):
    ns: EgressNamespace = egress_netns
    if family == 6 and not ns.has_v6:
        pytest.skip(f"no IPv6 in the test namespace: {ns.no_v6_reason}")
    v4_peers, v6_peers = deny_peers(vectors)
    peers = v4_peers if family == 4 else v6_peers
    allowed = ALLOWED_V4 if family == 4 else ALLOWED_V6
    app = appliance_factory(
        {
            "turn": {
                "relay_addresses": [ns.V4, ns.V6] if ns.has_v6 else [ns.V4],
                "allow_peers": ["198.51.100.0/24", "2001:db8:77::/48"],
            }
        },
        netns=ns.name,
    )
    sink_port = free_port()
    with in_netns(ns.name):
        # Catch-all sinks for the targets that are local (loopback, 0.0.0.0, ::, mapped).
        sink4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink4.bind(("0.0.0.0", sink_port))
        sinks = [sink4]
        if ns.has_v6:
            sink6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sink6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sink6.bind(("::", sink_port))
            sinks.append(sink6)
        c = client(app)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Harness self-check: the sink catches local traffic, d0 counts egress.
        before = ns.settle()
        probe.sendto(b"probe", ("127.0.0.1", sink_port))
        sink4.settimeout(2)
        assert sink4.recvfrom(100)[0] == b"probe"
        probe.sendto(b"probe", ("192.0.2.99", 9))
        time.sleep(0.2)
        assert ns.tx_packets() == before + 1

        if family == 4:
            c.allocate()
            assert c.relayed == (ns.V4, c.relayed[1])
        else:
            c.allocate(family=2)
            assert c.relayed == (ns.V6, c.relayed[1])

        base = ns.settle()
        results = {}
        for i, ip in enumerate(peers):
            peer = (ip, sink_port)
            r1 = c.create_permission(peer)
            r2 = c.channel_bind(0x4000 + i, peer)
            c.send_indication(peer, b"must-not-leave " + ip.encode())
            c.send_channel(0x4000 + i, b"must-not-leave either")
            results[ip] = (r1.error_code(), r2.error_code())
        bad = {ip: codes for ip, codes in results.items() if codes != (403, 403)}
        assert not bad, f"peers not refused with 403 (CreatePermission, ChannelBind): {bad}"

        # T18: a peer of the other family is a family mismatch (443), not a relay.
        other = ("::1", sink_port) if family == 4 else ("127.0.0.1", sink_port)
        expect_code(c.create_permission(other), 443, "peer of the other family")

        time.sleep(0.5)
        assert ns.tx_packets() == base, "a datagram left toward a denied peer"
        for s in sinks:
            assert drain(s) == []
        assert c.receive(0.1) == []

        # Control: an allowed public peer (allow_peers) does leave through d0, once per Send.
        assert c.create_permission(allowed).cls == tw.SUCCESS
        c.send_indication(allowed, b"allowed")
        deadline = time.monotonic() + 3
        while ns.tx_packets() < base + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert ns.tx_packets() == base + 1

        # The duplicate-peer Send vector: first an allowed address, second a loopback one.
        # Only the first is acted on.
        loop = ("127.0.0.1", sink_port) if family == 4 else ("::1", sink_port)
        c.send_indication([allowed, loop], b"dup")
        time.sleep(0.3)
        assert all(drain(s) == [] for s in sinks)
        assert ns.tx_packets() == base + 2, "first XOR-PEER-ADDRESS wins"
        assert app.alive()
    finally:
        for s in sinks + [probe]:
            s.close()
        c.close()
    assert "panicked" not in app.stderr()


def test_deny_vectors_get_403_on_loopback(appliance_factory, vectors):
    """The same refusal without a namespace: relay addresses 127.0.0.1 and ::1 (when the host
    has ::1), default policy."""
    v4_peers, v6_peers = deny_peers(vectors)
    v6 = has_ipv6_loopback()
    app = appliance_factory(
        {"turn": {"relay_addresses": ["127.0.0.1", "::1"] if v6 else ["127.0.0.1"]}}
    )
    with client(app) as c4:
        c4.allocate()
        for i, ip in enumerate(v4_peers):
            expect_code(c4.create_permission((ip, 80)), 403, f"CreatePermission {ip}")
            expect_code(c4.channel_bind(0x4000 + i, (ip, 80)), 403, f"ChannelBind {ip}")
    if not v6:
        pytest.skip("IPv4 part passed; the host has no ::1, so no IPv6 relay address to test")
    with client(app) as c6:
        c6.allocate(family=2)
        assert c6.relayed[0] == "::1"
        for i, ip in enumerate(v6_peers):
            expect_code(c6.create_permission((ip, 80)), 403, f"CreatePermission {ip}")
            expect_code(c6.channel_bind(0x4000 + i, (ip, 80)), 403, f"ChannelBind {ip}")


def echo_socket(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def test_own_service_ports_refused_even_with_loopback_allowed(appliance):
    app = appliance
    assert app.config["turn"]["allow_peers"] == ["127.0.0.0/8"]
    echo = echo_socket()
    echo.settimeout(2)
    with client(app) as c:
        c.allocate()
        for peer in (
            ("127.0.0.1", app.port),
            ("127.0.0.1", app.http_port),
            ("127.0.0.2", app.port),
            ("127.1.2.3", app.http_port),
            ("0.0.0.0", app.port),
        ):
            expect_code(c.create_permission(peer), 403, f"CreatePermission {peer}")
            expect_code(c.channel_bind(0x4001, peer), 403, f"ChannelBind {peer}")

        # Control: an ordinary loopback port is allowed and relays both ways.
        peer = echo.getsockname()
        assert c.create_permission(peer).cls == tw.SUCCESS
        c.send_indication(peer, b"ping")
        data, src = echo.recvfrom(100)
        assert data == b"ping" and src == c.relayed

        # A Send to the listener on the permitted IP: a relay loop would make the appliance
        # answer this Binding request to its own relay address, which would come back to us
        # as a Data indication from 127.0.0.1:<listener>. Nothing may come back.
        loop_probe = tw.Msg(tw.BINDING, tw.REQUEST).encode()
        c.send_indication(("127.0.0.1", app.port), loop_probe)
        # The same probe through the echo peer does come back (the mechanism works).
        c.send_indication(peer, loop_probe)
        d, src = echo.recvfrom(200)
        echo.sendto(d, src)
        got = c.receive(1.0)
        assert ("data", peer, loop_probe) in got
        assert [g for g in got if g[1] != peer] == [], got
    echo.close()


def test_duplicate_xor_peer_address_first_wins(appliance):
    """P11: a Send with two XOR-PEER-ADDRESS attributes goes to the first one only, never to
    the second, whatever the order; if the first has no permission nothing is relayed."""
    r1 = echo_socket("127.0.0.2")
    r2 = echo_socket("127.0.0.1")
    a1, a2 = r1.getsockname(), r2.getsockname()
    with client(appliance) as c:
        c.allocate()
        assert c.create_permission(a1, a2).cls == tw.SUCCESS
        c.send_indication([a1, a2], b"first-is-r1")
        c.send_indication([a2, a1], b"first-is-r2")
        # 8.8.8.8 has no permission: the indication is dropped, not re-targeted.
        c.send_indication([("8.8.8.8", 5000), a2], b"first-not-permitted")
        time.sleep(0.5)
        assert [d for d, _ in drain(r1)] == [b"first-is-r1"]
        assert [d for d, _ in drain(r2)] == [b"first-is-r2"]
    r1.close()
    r2.close()


def test_duplicate_peer_vector_bytes(appliance, vectors):
    """The literal `turn-send-indication-duplicate-peer` bytes (8.8.8.8:5000 then
    127.0.0.1:22) from a client whose allocation has a permission for 127.0.0.1."""
    hexs = vectors["turn-send-indication-duplicate-peer"]["hex"]
    with client(appliance) as c:
        c.allocate()
        assert c.create_permission(("127.0.0.1", 9)).cls == tw.SUCCESS
        try:
            catcher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            catcher.bind(("127.0.0.1", 22))
        except OSError:
            pytest.skip("cannot bind UDP 127.0.0.1:22 to watch for the second peer")
        try:
            c.send_raw(bytes.fromhex(hexs))
            time.sleep(0.5)
            assert drain(catcher) == []
        finally:
            catcher.close()
    assert appliance.alive()


def test_data_from_peer_without_permission_is_dropped(appliance):
    """T13: a peer that has no permission cannot reach the client through the relay."""
    stranger = echo_socket("127.0.0.3")
    friend = echo_socket("127.0.0.1")
    with client(appliance) as c:
        c.allocate()
        assert c.create_permission(friend.getsockname()).cls == tw.SUCCESS
        stranger.sendto(b"from-stranger", c.relayed)
        friend.sendto(b"from-friend", c.relayed)
        got = c.receive(0.7)
        assert got == [("data", friend.getsockname(), b"from-friend")], got
        # ChannelData on a channel that was never bound is dropped as well.
        c.send_channel(0x4ABC, b"unbound")
        friend.settimeout(0.5)
        with pytest.raises(socket.timeout):
            friend.recvfrom(100)
    stranger.close()
    friend.close()
