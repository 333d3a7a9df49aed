#!/usr/bin/env python3
"""Regenerate the seed corpus from the STUN/TURN vectors (relay/tests/vectors)."""
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


if __name__ == "__main__":
    main()
