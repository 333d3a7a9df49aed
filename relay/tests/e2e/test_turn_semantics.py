"""TURN request semantics over the wire with the raw client (checklist 7.1 P10/P13, 7.2
T7-T10/T12/T18, 7.3 A2)."""

from __future__ import annotations

import struct

import pytest

import turnwire as tw
from conftest import PASSWORD, REALM, USER, client

BOB, BOB_PW = "bob", "bobs-password"


@pytest.fixture(scope="module")
def app(actrix_bin, tmp_path_factory):
    from conftest import Appliance

    d = tmp_path_factory.mktemp("semantics")
    over = {
        "turn": {
            "allow_peers": ["127.0.0.0/8"],
            "users": [{"name": USER, "password": PASSWORD}, {"name": BOB, "password": BOB_PW}],
            "rfc5766_channel_range": False,
            "max_allocations_per_user": 2,
        }
    }
    with Appliance(actrix_bin, d, over) as a:
        yield a
    assert "panicked" not in a.stderr()


def code(resp: tw.Msg) -> int | None:
    return resp.error_code() if resp.cls == tw.ERROR else 200


UDP = (tw.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))


def signed(c: tw.RawTurnClient, method: int, attrs) -> tw.Msg:
    m = tw.Msg(method, tw.REQUEST)
    for t, v in attrs:
        m.add(t, v)
    m.add(tw.USERNAME, c.user.encode()).add(tw.REALM, c.realm.encode()).add(tw.NONCE, c.nonce)
    return m


def learn_nonce(c: tw.RawTurnClient) -> None:
    """Get a nonce and key without creating anything (a Refresh with no allocation: 437)."""
    assert code(c.request(tw.REFRESH, [(tw.LIFETIME, struct.pack("!I", 600))])) == 437


def test_allocate_retransmission_is_idempotent_new_transaction_is_437(app):
    """T7: the same transaction again gets the same success; a new one gets 437."""
    with client(app, bind=("127.0.3.1", 0)) as c:
        learn_nonce(c)
        m = signed(c, tw.ALLOCATE, [UDP])
        r1 = c.transact(m, c.key)
        r2 = c.transact(m, c.key)
        assert code(r1) == 200 and code(r2) == 200
        assert r1.xor_addr(tw.XOR_RELAYED_ADDRESS) == r2.xor_addr(tw.XOR_RELAYED_ADDRESS)
        assert code(c.request(tw.ALLOCATE, [UDP])) == 437
        assert code(c.refresh(0)) == 200


def test_other_users_credentials_get_441_and_change_nothing(app):
    """T8: Refresh/CreatePermission/ChannelBind on alice's allocation signed by bob."""
    with client(app, bind=("127.0.3.2", 0)) as c:
        c.allocate()
        c.user, c.password = BOB, BOB_PW
        c.key = tw.long_term_key(BOB, REALM, BOB_PW)
        assert code(c.refresh(0)) == 441
        assert code(c.create_permission(("127.0.0.1", 9))) == 441
        assert code(c.channel_bind(0x4001, ("127.0.0.1", 9))) == 441
        c.user, c.password = USER, PASSWORD
        c.key = tw.long_term_key(USER, REALM, PASSWORD)
        r = c.refresh(600)  # still there, still alice's
        assert code(r) == 200 and struct.unpack("!I", r.get(tw.LIFETIME))[0] == 600
        assert code(c.refresh(0)) == 200


@pytest.mark.parametrize(
    "requested,granted", [(0, 600), (1, 600), (0xFFFFFFFF, 3600), (1200, 1200)]
)
def test_allocate_lifetime_is_clamped(app, requested, granted):
    """T9: LIFETIME 0/1 get the default, 0xFFFFFFFF the maximum; no overflow."""
    with client(app, bind=("127.0.3.3", 0)) as c:
        c.allocate(lifetime=requested)
        assert c.lifetime == granted
        r = c.refresh(0xFFFFFFFF)
        assert struct.unpack("!I", r.get(tw.LIFETIME))[0] == 3600
        r = c.refresh(0)
        assert code(r) == 200 and struct.unpack("!I", r.get(tw.LIFETIME))[0] == 0
        # Deleted: a further Refresh finds nothing.
        assert code(c.refresh(600)) == 437


def test_quota_is_per_username_and_returned_on_delete(app):
    """T10: max_allocations_per_user = 2, counted by username from one IP; 486 past it."""
    clients = [client(app, bind=("127.0.3.4", 0)) for _ in range(3)]
    b = client(app, BOB, BOB_PW, bind=("127.0.3.4", 0))
    try:
        assert code(clients[0].allocate()) == 200
        assert code(clients[1].allocate()) == 200
        assert code(clients[2].allocate(check=False)) == 486
        assert code(b.allocate()) == 200  # another user from the same IP is not affected
        assert code(clients[0].refresh(0)) == 200
        assert code(clients[2].allocate()) == 200  # the quota came back
    finally:
        for c in clients + [b]:
            try:
                c.refresh(0)
            except tw.TurnError:
                pass
            c.close()


@pytest.mark.parametrize("number,expected", [(0x3FFF, 400), (0x4000, 200), (0x4FFF, 200),
                                             (0x5000, 400), (0xFFFF, 400)])
def test_channel_number_range(app, number, expected):
    """T12 with rfc5766_channel_range = false: only 0x4000-0x4FFF."""
    with client(app, bind=("127.0.3.5", 0)) as c:
        c.allocate()
        assert code(c.channel_bind(number, ("127.0.0.1", 9))) == expected
        c.refresh(0)


def test_channel_rebinding_rules(app):
    """T12: a channel cannot move to another peer, a peer cannot get a second channel; the
    same binding again refreshes it."""
    with client(app, bind=("127.0.3.6", 0)) as c:
        c.allocate()
        assert code(c.channel_bind(0x4010, ("127.0.0.1", 9))) == 200
        assert code(c.channel_bind(0x4010, ("127.0.0.1", 9))) == 200
        assert code(c.channel_bind(0x4010, ("127.0.0.1", 10))) == 400
        assert code(c.channel_bind(0x4011, ("127.0.0.1", 9))) == 400
        c.refresh(0)


def test_unknown_comprehension_required_attribute_gets_420(app):
    """P10: 420 with UNKNOWN-ATTRIBUTES naming it; comprehension-optional ones are ignored."""
    with client(app, bind=("127.0.3.7", 0)) as c:
        r = c.request(tw.ALLOCATE, [UDP, (0x7777, b"\0\0\0\0")])
        assert code(r) == 420
        assert r.get(tw.UNKNOWN_ATTRIBUTES) == struct.pack("!H", 0x7777)
        # DONT-FRAGMENT is not supported (RFC 8656 §7.2 step 3): 420 as well.
        assert code(c.request(tw.ALLOCATE, [UDP, (0x001A, b"")])) == 420
        r = c.request(tw.ALLOCATE, [UDP, (0x8777, b"\0\0\0\0")])
        assert code(r) == 200
        c.refresh(0)
        # Binding too.
        m = tw.Msg(tw.BINDING, tw.REQUEST).add(0x7777, b"")
        r = c.transact(m, None)
        assert code(r) == 420 and r.get(tw.UNKNOWN_ATTRIBUTES) == struct.pack("!H", 0x7777)


def test_transport_and_family_errors(app):
    """T18: a transport other than UDP or TCP 442; a TCP allocation asked for over UDP 400
    (RFC 6062 section 5.1: only a TCP or TLS client connection can hold one); IPv6 requested
    from a node without an IPv6 relay address 440; missing REQUESTED-TRANSPORT 400."""
    with client(app, bind=("127.0.3.8", 0)) as c:
        assert code(c.request(tw.ALLOCATE, [(tw.REQUESTED_TRANSPORT, bytes([132, 0, 0, 0]))])) == 442
        assert code(c.request(tw.ALLOCATE, [(tw.REQUESTED_TRANSPORT, bytes([6, 0, 0, 0]))])) == 400
        assert code(c.allocate(family=2, check=False)) == 440
        assert code(c.request(tw.ALLOCATE, [])) == 400


def test_oversized_text_attributes_get_400(app):
    """P13: USERNAME beyond the limit, REALM/NONCE > 763 bytes: 400, no allocation."""
    with client(app, bind=("127.0.3.9", 0)) as c:
        learn_nonce(c)
        for attrs in (
            [(tw.USERNAME, b"u" * 1100), (tw.REALM, REALM.encode()), (tw.NONCE, c.nonce)],
            [(tw.USERNAME, USER.encode()), (tw.REALM, b"r" * 800), (tw.NONCE, c.nonce)],
            [(tw.USERNAME, USER.encode()), (tw.REALM, REALM.encode()), (tw.NONCE, b"n" * 800)],
        ):
            m = tw.Msg(tw.ALLOCATE, tw.REQUEST, attrs=[UDP] + attrs)
            assert code(c.transact(m, c.key)) == 400


def test_bad_nonces_are_refused(app):
    """A2: a tampered nonce, a nonce issued to another client port, or a made-up one: 401
    (with a fresh nonce), never success."""
    with client(app, bind=("127.0.3.10", 0)) as other:
        learn_nonce(other)
        foreign = other.nonce
    with client(app, bind=("127.0.3.10", 0)) as c:
        learn_nonce(c)
        good = c.nonce
        flipped = bytes([good[-1] ^ 1])
        for nonce in (good[:-1] + flipped, foreign, b"0123456789abcdef", good.upper(), good + b"00"):
            if nonce == good:
                continue
            m = tw.Msg(tw.ALLOCATE, tw.REQUEST, attrs=[
                UDP, (tw.USERNAME, USER.encode()), (tw.REALM, REALM.encode()), (tw.NONCE, nonce)
            ])
            r = c.transact(m, c.key)
            assert r is not None and code(r) in (401, 438), (nonce, r)
            assert r.get(tw.NONCE) and r.get(tw.NONCE) != nonce
        # The genuine nonce still works.
        m = tw.Msg(tw.ALLOCATE, tw.REQUEST, attrs=[
            UDP, (tw.USERNAME, USER.encode()), (tw.REALM, REALM.encode()), (tw.NONCE, good)
        ])
        assert code(c.transact(m, c.key)) == 200
        c.refresh(0)
