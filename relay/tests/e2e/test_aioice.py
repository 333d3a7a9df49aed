"""aioice's TURN client (as used by aiortc) against the appliance."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

import turnwire as tw
from conftest import PASSWORD, USER, client, metric_sum, metrics


class Collector(asyncio.DatagramProtocol):
    """Records what arrives; `wait_for(n)` returns once n datagrams are there."""

    def __init__(self):
        self.received: list[tuple[bytes, tuple]] = []
        self.errors: list[Exception] = []
        self._cond: asyncio.Condition | None = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self._cond = asyncio.Condition()

    def datagram_received(self, data, addr):
        self.received.append((data, addr))
        asyncio.get_running_loop().create_task(self._notify())

    def error_received(self, exc):
        self.errors.append(exc)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self):
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, pred, timeout: float = 5.0) -> bool:
        async def inner():
            async with self._cond:
                await self._cond.wait_for(pred)

        try:
            await asyncio.wait_for(inner(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class Echo(asyncio.DatagramProtocol):
    """A plain UDP echo server; remembers who sent what."""

    def __init__(self):
        self.sources: list[tuple] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.sources.append(addr)
        self.transport.sendto(data, addr)


def inner_protocol(turn_transport):
    return turn_transport._TurnTransport__inner_protocol


async def create_permission(turn_transport, peer):
    proto = inner_protocol(turn_transport)
    req = stun.Message(
        message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST
    )
    req.attributes["XOR-PEER-ADDRESS"] = peer
    resp, _ = await proto.request_with_retry(req)
    return resp


def run(coro, timeout: float = 40):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.mark.parametrize("backend", ["mmsg", "glommio"])
def test_aioice_allocate_permission_channel_refresh_echo(appliance_factory, caplog, backend):
    caplog.set_level(logging.INFO, logger="aioice.turn")
    # Short lifetimes so aioice's own refresh task has to keep the allocation alive while we
    # watch (it refreshes at 5/6 of the granted lifetime).
    app = appliance_factory(
        {
            "turn": {"allow_peers": ["127.0.0.0/8"], "default_lifetime": 3},
            "io": {"backend": backend},
        }
    )

    async def main():
        loop = asyncio.get_running_loop()
        echo_t, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        echo_addr = echo_t.get_extra_info("sockname")
        turn, coll = await create_turn_endpoint(
            Collector, app.addr, USER, PASSWORD, lifetime=3
        )
        try:
            relayed = turn.get_extra_info("sockname")
            assert relayed[0] == "127.0.0.1"
            lo, hi = map(int, app.config["turn"]["relay_port_range"].split("-"))
            assert lo <= relayed[1] <= hi
            mapped = turn.get_extra_info("related_address")
            proto = inner_protocol(turn)
            assert mapped == proto.transport.get_extra_info("sockname")

            resp = await create_permission(turn, echo_addr)
            assert resp.message_class == stun.Class.RESPONSE

            # First send binds channel 0x4000 (ChannelBind), then ChannelData both ways.
            payloads = [f"dgram-{i}".encode() * (i + 1) for i in range(20)]
            for p in payloads:
                turn.sendto(p, echo_addr)
                await asyncio.sleep(0.01)
            assert await coll.wait_for(lambda: len(coll.received) >= len(payloads))
            assert [d for d, _ in coll.received] == payloads
            assert all(a == echo_addr for _, a in coll.received)
            assert proto.peer_to_channel.get(echo_addr) == 0x4000
            # The echo server saw the relay address as the source: it went through the relay.
            assert set(echo.sources) == {relayed}

            assert "expires in 3 seconds" in caplog.text, caplog.text
            # A control allocation with the same lifetime that nobody refreshes.
            with client(app) as idle:
                idle.allocate(lifetime=3)
                assert idle.lifetime == 3

                # Lifetime 3 s: without aioice's refresh at 2.5 s it would be gone by now.
                await asyncio.sleep(4.5)
                assert "TURN allocation refreshed" in caplog.text, caplog.text
                gone = idle.refresh(600)
                assert gone.cls == tw.ERROR and gone.error_code() == 437, gone
            assert not proto.transport.is_closing(), "the refresh failed"
            coll.received.clear()
            turn.sendto(b"after-refresh", echo_addr)
            assert await coll.wait_for(lambda: len(coll.received) >= 1)
            assert coll.received[0] == (b"after-refresh", echo_addr)

            # An explicit Refresh returns the lifetime granted.
            req = stun.Message(
                message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST
            )
            req.attributes["LIFETIME"] = 60
            resp, _ = await proto.request_with_retry(req)
            assert resp.attributes["LIFETIME"] == 60
            assert not coll.errors
        finally:
            turn.close()
            await asyncio.sleep(0.3)
            echo_t.close()
        # After the delete (Refresh LIFETIME=0) the relay port is closed.
        assert proto.transport.is_closing()

    run(main())
    # The shards ran on the backend asked for (no fallback).
    assert f'backend="{backend}"' in app.stderr()
    assert f"{backend} unavailable" not in app.stderr()


@pytest.mark.parametrize("backend", ["mmsg", "glommio"])
def test_aioice_two_clients_relay_to_each_other_under_default_policy(appliance_factory, backend):
    app = appliance_factory({"io": {"backend": backend}})  # no allow_peers: loopback refused...
    assert "allow_peers" not in app.config["turn"]

    async def main():
        loop = asyncio.get_running_loop()
        a, ca = await create_turn_endpoint(Collector, app.addr, USER, PASSWORD)
        b, cb = await create_turn_endpoint(Collector, app.addr, USER, PASSWORD)
        echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        try:
            ra, rb = a.get_extra_info("sockname"), b.get_extra_info("sockname")
            assert ra != rb

            # ...so a plain loopback peer gets 403...
            with pytest.raises(stun.TransactionFailed) as e:
                await create_permission(a, echo_t.get_extra_info("sockname"))
            assert e.value.response.attributes["ERROR-CODE"][0] == 403

            # ...but the relay address of another allocation on this appliance is allowed.
            b.sendto(b"hello-from-b", ra)  # binds B's channel (and permission) toward A
            for _ in range(50):
                if inner_protocol(b).peer_to_channel.get(ra) is not None or cb.errors:
                    break
                await asyncio.sleep(0.05)
            assert not cb.errors, cb.errors
            assert inner_protocol(b).peer_to_channel.get(ra) is not None

            msgs = [f"a-to-b-{i}".encode() for i in range(10)]
            for m in msgs:
                a.sendto(m, rb)
                await asyncio.sleep(0.01)
            assert await cb.wait_for(lambda: len(cb.received) >= len(msgs)), cb.received
            assert cb.received == [(m, ra) for m in msgs]

            # B's first datagram reached A's relay before A had any permission: dropped.
            assert ca.received == []
            replies = [f"b-to-a-{i}".encode() for i in range(10)]
            for m in replies:
                b.sendto(m, ra)
                await asyncio.sleep(0.01)
            assert await ca.wait_for(lambda: len(ca.received) >= len(replies)), ca.received
            assert ca.received == [(m, rb) for m in replies]
            assert not ca.errors and not cb.errors
        finally:
            a.close()
            b.close()
            await asyncio.sleep(0.3)
            echo_t.close()

    run(main())
    # The shards ran on the backend asked for (no fallback).
    assert f'backend="{backend}"' in app.stderr()
    assert f"{backend} unavailable" not in app.stderr()


@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_aioice_over_tcp_relays_with_channels(appliance_factory, backend):
    """aioice with transport="tcp": the TURN session on a TCP connection, relayed over UDP to
    an echo peer; closing it ends the allocation."""
    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": backend}}, tcp=True
    )

    async def main():
        loop = asyncio.get_running_loop()
        echo_t, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        echo_addr = echo_t.get_extra_info("sockname")
        turn, coll = await create_turn_endpoint(
            Collector, app.addr, USER, PASSWORD, transport="tcp"
        )
        try:
            relayed = turn.get_extra_info("sockname")
            resp = await create_permission(turn, echo_addr)
            assert resp.message_class == stun.Class.RESPONSE
            payloads = [f"tcp-{i}".encode() * (i + 1) for i in range(30)]
            for p in payloads:
                turn.sendto(p, echo_addr)
                await asyncio.sleep(0.005)
            assert await coll.wait_for(lambda: len(coll.received) >= len(payloads))
            assert [d for d, _ in coll.received] == payloads
            assert set(echo.sources) == {relayed}
            assert inner_protocol(turn).peer_to_channel.get(echo_addr) is not None
        finally:
            turn.close()
            await asyncio.sleep(0.5)
            echo_t.close()

    run(main())
    m = metrics(app)
    assert m["actrix_stream_accepted_total"] >= 1
    assert m.get("actrix_allocations_active", 0) == 0, "the allocation ended with the connection"


@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_aioice_over_tls_relays_with_channels(appliance_factory, backend):
    """aioice with transport="tcp" and ssl: the TURN session inside TLS (Python's ssl, i.e.
    OpenSSL), relayed over UDP to an echo peer and back."""
    import ssl

    app = appliance_factory(
        {"turn": {"allow_peers": ["127.0.0.0/8"]}, "io": {"backend": backend}}, tls=True
    )
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["stun.turn"])

    async def main():
        loop = asyncio.get_running_loop()
        echo_t, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        echo_addr = echo_t.get_extra_info("sockname")
        turn, coll = await create_turn_endpoint(
            Collector, (app.host, app.tls_port), USER, PASSWORD, transport="tcp", ssl=ctx
        )
        try:
            relayed = turn.get_extra_info("sockname")
            resp = await create_permission(turn, echo_addr)
            assert resp.message_class == stun.Class.RESPONSE
            payloads = [f"tls-{i}".encode() * (i + 1) for i in range(30)]
            for p in payloads:
                turn.sendto(p, echo_addr)
                await asyncio.sleep(0.005)
            assert await coll.wait_for(lambda: len(coll.received) >= len(payloads))
            assert [d for d, _ in coll.received] == payloads
            assert set(echo.sources) == {relayed}
        finally:
            turn.close()
            await asyncio.sleep(0.5)
            echo_t.close()

    run(main())
    m = metrics(app)
    assert metric_sum(m, "actrix_stream_accepted_total", transport="tls") >= 1, m
    assert m.get("actrix_allocations_active", 0) == 0, "the allocation ended with the connection"
