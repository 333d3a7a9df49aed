#!/usr/bin/env python3
"""Regenerate the seed corpus: STUN/TURN targets from the vectors (relay/tests/vectors),
signaling_envelope from hand-encoded protobuf scripts (see fuzz_targets/signaling_envelope.rs)."""
import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
VEC = os.path.join(HERE, "..", "tests", "vectors", "rfc5769-vectors.txt")


def vectors():
    out, cur = {}, None
    for line in open(VEC, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = line[1:-1]
            out[cur] = {}
        elif " = " in line and cur:
            k, v = line.split(" = ", 1)
            out[cur][k] = v
    return out


def put(target, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def record(kind, body):
    return bytes([kind]) + struct.pack(">H", len(body)) + body


def main():
    v = vectors()
    datagrams = [bytes.fromhex(x["hex"]) for x in v.values() if "hex" in x]
    for d in datagrams:
        put("stun_decode", d)
        put("turn_unauthenticated", record(0, d) + record(1, d[:40]))
    # Authenticated: [method selector, tid byte, raw attribute records (type, len, value)].
    attrs = {
        "allocate": bytes([0, 7]) + b"\x00\x19\x04\x11\x00\x00\x00",
        "allocate-even": bytes([0, 8]) + b"\x00\x19\x04\x11\x00\x00\x00" + b"\x00\x18\x01\x80",
        "refresh0": bytes([1, 9]) + b"\x00\x0d\x04\x00\x00\x00\x00",
        "perm": bytes([2, 10]) + b"\x00\x12\x08\x00\x01\x21\x42\x5e\x12\xa4\x43",
        "bind": bytes([3, 11]) + b"\x00\x0c\x04\x40\x00\x00\x00" + b"\x00\x12\x08\x00\x01\x21\x42\x5e\x12\xa4\x43",
    }
    seq = record(0, attrs["allocate"]) + record(0, attrs["perm"]) + record(0, attrs["bind"]) \
        + record(1, b"peer data") + record(0, b"\x40\x00\x00\x04ping") + record(0x30, attrs["refresh0"])
    put("turn_authenticated", seq)
    for a in attrs.values():
        put("turn_authenticated", record(0, attrs["allocate"]) + record(0, a))
    signaling()


# ----- signaling_envelope: protobuf by hand (field numbers of signaling/src/proto.rs) -----


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def pb_int(tag, n):
    return varint(tag << 3) + varint(n)


def pb_len(tag, b):
    return varint(tag << 3 | 2) + varint(len(b)) + b


def pb_str(tag, s):
    return pb_len(tag, s.encode())


def pb_f32(tag, x):
    return varint(tag << 3 | 5) + struct.pack("<f", x)


def actr_type(name):
    return pb_str(1, "a") + pb_str(2, name) + pb_str(3, "1")


def actr_id(realm, serial, name):
    return pb_len(1, pb_int(1, realm)) + pb_int(2, serial) + pb_len(3, actr_type(name))


CRED = pb_len(1, b"token") + pb_int(2, 1)
X, Y = actr_id(1, 1, "x"), actr_id(1, 2, "y")  # what the auto-answered AIS gives conns 1, 2
ENV_IDS = iter(range(1, 1 << 20))


def envelope(flow_tag, flow):
    eid = "e%d" % next(ENV_IDS)
    return pb_int(1, 1) + pb_str(2, eid) + pb_len(4, pb_int(1, 1700000000)) + pb_len(flow_tag, flow)


def spec(name, fp, packages):
    return pb_str(1, name) + pb_str(3, fp) + b"".join(
        pb_len(4, pb_str(1, p) + pb_str(2, "") + pb_str(3, f)) for p, f in packages)


def register(name, realm=1, allow=None, spec_bytes=None):
    req = pb_len(1, actr_type(name)) + pb_len(2, pb_int(1, realm))
    if spec_bytes is not None:
        req += pb_len(3, spec_bytes)
    if allow is not None:
        req += pb_len(4, pb_len(1, pb_len(1, pb_len(2, actr_type(allow))) + pb_int(2, 1)))
    return envelope(10, pb_len(1, req))


def actr(src, tag, payload):
    return envelope(11, pb_len(1, src) + pb_len(2, CRED) + pb_len(tag, payload))


def relay(src, dst, tag, payload):
    return envelope(13, pb_len(1, src) + pb_len(2, CRED) + pb_len(3, dst) + pb_len(tag, payload))


def ping(src, availability=0):
    return actr(src, 4, pb_int(1, availability) + pb_f32(2, 0.5) + pb_f32(3, 0.25))


def sdp(kind, text):
    return pb_int(1, kind) + pb_str(2, text)


# Script operations and verdicts (the first byte of a script is the setup byte).
AIS, AUTO, FEW_SUBS = 1, 2, 4
NONE, INVALID, VALID, EXPIRED, TOLERANCE, OTHER, WRONG_REALM = range(7)
FIX_SRC, FIX_DST = 8, 16


def connect(ident=None, answerer=False):
    return bytes([0, (0 if ident is None else 1 | ident << 1) | (0x10 if answerer else 0)])


def disconnect(slot):
    return bytes([1, slot])


def frame(slot, verdict, data, target_slot=0):
    return bytes([2, slot | target_slot << 4, verdict]) + struct.pack(">H", len(data)) + data


def advance(secs):
    return bytes([3]) + struct.pack(">H", secs * 4)


def answer(sel):
    return bytes([4, sel])


def rate_limited(slot):
    return bytes([5, slot])


def signaling():
    t = "signaling_envelope"
    reg_x = register("x", allow="y", spec_bytes=spec("svc-x", "fx", [("x.v1", "1")]))
    reg_y = register("y", allow="x", spec_bytes=spec("svc-y", "fy", [("y.v1", "1")]))
    # Register, Ping, heartbeat eviction, Ping restored from the database, key in tolerance.
    put(t, bytes([AIS | AUTO]) + connect() + frame(0, NONE, reg_x) + frame(0, VALID, ping(X))
        + advance(400) + frame(0, VALID, ping(X, 1)) + frame(0, TOLERANCE, ping(X)))
    # Relay between two registered actors: SDP both ways, ICE, role negotiation, ICE restart,
    # a relay to nobody.
    put(t, bytes([AIS | AUTO]) + connect() + connect(answerer=True)
        + frame(0, NONE, reg_x) + frame(1, NONE, reg_y)
        + frame(0, VALID, relay(X, Y, 11, sdp(0, "v=0 offer")))
        + frame(1, VALID, relay(Y, X, 11, sdp(1, "v=0 answer")))
        + frame(0, VALID, relay(X, Y, 10, pb_str(1, "candidate:1 1 udp 1 10.0.0.1 9 typ host")))
        + frame(0, VALID, relay(X, Y, 12, pb_len(1, X) + pb_len(2, Y) + pb_int(3, 1)))
        + frame(1, VALID, relay(Y, X, 14, pb_str(1, "network change")))
        + frame(0, VALID, relay(X, actr_id(1, 9, "y"), 11, sdp(0, "v=0"))))
    # Discovery, route candidates (plain and negotiation), service spec, ActrUp subscription.
    criteria = pb_int(1, 3) + pb_int(2, 0) + pb_int(2, 1) + pb_int(4, 1)
    put(t, bytes([AIS | AUTO]) + connect() + frame(0, NONE, reg_x)
        + frame(0, VALID, actr(X, 20, pb_len(1, actr_type("y"))))
        + connect() + frame(1, NONE, reg_y)
        + frame(0, VALID, actr(X, 10, b""))
        + frame(0, VALID, actr(X, 10, pb_str(1, "a") + pb_int(2, 1)))
        + frame(0, VALID, actr(X, 11, pb_len(1, actr_type("y")) + pb_len(2, criteria) + pb_str(4, "")))
        + frame(0, VALID, actr(X, 11, pb_len(1, actr_type("y")) + pb_str(4, "fy")))
        + frame(0, VALID, actr(X, 12, pb_str(1, "svc-y")))
        + frame(0, VALID, actr(X, 12, pb_str(1, "nothing")))
        + frame(0, VALID, actr(X, 21, pb_len(1, actr_type("y")))))
    # URL identity: Ping restores (nothing stored), register refused, eviction by a newer
    # connection with the same identity.
    put(t, bytes([AUTO]) + connect(ident=0) + frame(0, VALID, ping(X)) + frame(0, NONE, reg_x)
        + connect(ident=0) + frame(1, VALID, ping(X)) + frame(0, VALID, ping(X)) + disconnect(0)
        + frame(0, VALID, ping(X)))
    # Malformed frame, a frame after it (ignored), rate limit, an empty frame.
    put(t, bytes([AIS | AUTO]) + connect() + connect() + frame(0, NONE, b"\x0a\x05\xff")
        + frame(0, NONE, reg_x) + rate_limited(1) + frame(1, NONE, b"") + disconnect(0))
    # AIS answers by hand: a failed register, a good one, a credential update, unregister.
    put(t, bytes([AIS]) + connect() + frame(0, NONE, reg_x) + frame(0, NONE, reg_x)
        + answer(0x80) + frame(0, NONE, reg_x) + answer(0)
        + frame(0, VALID, actr(X, 5, pb_len(1, X))) + answer(0)
        + frame(0, VALID, ping(X)) + frame(0, VALID, actr(X, 3, pb_len(1, X) + pb_str(2, "bye")))
        + frame(0, VALID, ping(X)))
    # Credential verdicts that fail: none, invalid, expired, someone else's, another realm,
    # a source the connection is not bound to; a register in an unknown realm.
    put(t, bytes([AIS | AUTO]) + connect() + frame(0, NONE, reg_x)
        + b"".join(frame(0, v, ping(X)) for v in (NONE, INVALID, EXPIRED, OTHER | 2 << 5, WRONG_REALM))
        + frame(0, VALID, ping(Y)) + connect() + frame(1, NONE, register("x", realm=3)))
    # Unregister, then register again; AIS unavailable.
    put(t, bytes([AIS | AUTO]) + connect() + frame(0, NONE, reg_x)
        + frame(0, VALID, actr(X, 3, pb_len(1, X))) + frame(0, NONE, reg_x) + frame(0, VALID, ping(X)))
    put(t, bytes([AUTO]) + connect() + frame(0, NONE, reg_x))
    # Fix-ups: a relay with empty ids made to speak from slot 0 to slot 1; subscription limit.
    put(t, bytes([AIS | AUTO | FEW_SUBS]) + connect() + connect() + frame(0, NONE, reg_x)
        + frame(1, NONE, reg_y)
        + frame(0, VALID | FIX_SRC | FIX_DST, relay(b"", b"", 11, sdp(0, "v=0")), target_slot=1)
        + frame(0, VALID | FIX_SRC | FIX_DST, relay(b"", b"", 12, b""), target_slot=1)
        + frame(0, VALID | FIX_SRC, actr(b"", 20, pb_len(1, actr_type("y"))))
        + frame(0, VALID | FIX_SRC, actr(b"", 20, pb_len(1, actr_type("z")))))
    # Realm 2 expires after an hour.
    put(t, bytes([AIS | AUTO]) + connect() + frame(0, NONE, register("x", realm=2, allow="y"))
        + frame(0, VALID, ping(actr_id(2, 1, "x"))) + advance(3700)
        + frame(0, VALID, ping(actr_id(2, 1, "x"))))


if __name__ == "__main__":
    main()
