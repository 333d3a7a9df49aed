"""A small raw-socket STUN/TURN client for the end-to-end tests.

Only the standard library: messages are built and parsed by hand (RFC 8489 / RFC 8656), so a
test can send exactly the bytes it wants (duplicate attributes, forbidden peers, damaged
integrity) and see exactly what comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import time
import zlib

MAGIC = 0x2112A442
MAGIC_BYTES = struct.pack("!I", MAGIC)

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Classes
REQUEST = 0
INDICATION = 1
SUCCESS = 2
ERROR = 3

# Attributes
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
PASSWORD_ALGORITHMS = 0x8002
FINGERPRINT = 0x8028


def message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def split_type(t: int) -> tuple[int, int]:
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    cls = ((t >> 4) & 1) | ((t >> 7) & 2)
    return method, cls


def pad4(n: int) -> int:
    return (4 - n % 4) % 4


def encode_xor_addr(addr: tuple[str, int], tid: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ (MAGIC >> 16)
    if ip.version == 4:
        x = int(ip) ^ MAGIC
        return struct.pack("!BBHI", 0, 1, port, x)
    key = MAGIC_BYTES + tid
    raw = bytes(a ^ b for a, b in zip(ip.packed, key))
    return struct.pack("!BBH", 0, 2, port) + raw


def decode_xor_addr(v: bytes, tid: bytes) -> tuple[str, int]:
    fam = v[1]
    port = struct.unpack("!H", v[2:4])[0] ^ (MAGIC >> 16)
    if fam == 1:
        x = struct.unpack("!I", v[4:8])[0] ^ MAGIC
        return str(ipaddress.IPv4Address(x)), port
    key = MAGIC_BYTES + tid
    raw = bytes(a ^ b for a, b in zip(v[4:20], key))
    return str(ipaddress.IPv6Address(raw)), port


def long_term_key(user: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).digest()


def rest_credentials(secret: str, name: str, ttl: int = 3600) -> tuple[str, str]:
    """TURN REST API credentials (draft-uberti-behave-turn-rest): user = expiry:name."""
    import base64

    user = f"{int(time.time()) + ttl}:{name}"
    pw = base64.b64encode(hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest())
    return user, pw.decode()


class Msg:
    """A STUN message: method, class, transaction id and an ordered attribute list."""

    def __init__(self, method: int, cls: int, tid: bytes | None = None, attrs=None):
        self.method = method
        self.cls = cls
        self.tid = tid if tid is not None else os.urandom(12)
        self.attrs: list[tuple[int, bytes]] = list(attrs or [])

    def add(self, typ: int, value: bytes) -> "Msg":
        self.attrs.append((typ, value))
        return self

    def add_u32(self, typ: int, v: int) -> "Msg":
        return self.add(typ, struct.pack("!I", v))

    def add_xor(self, typ: int, addr: tuple[str, int]) -> "Msg":
        return self.add(typ, encode_xor_addr(addr, self.tid))

    def _body(self) -> bytes:
        out = b""
        for t, v in self.attrs:
            out += struct.pack("!HH", t, len(v)) + v + b"\0" * pad4(len(v))
        return out

    def encode(self, key: bytes | None = None, fingerprint: bool = False) -> bytes:
        body = self._body()
        t = message_type(self.method, self.cls)
        if key is not None:
            hdr = struct.pack("!HHI", t, len(body) + 24, MAGIC) + self.tid
            mac = hmac.new(key, hdr + body, hashlib.sha1).digest()
            body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
        if fingerprint:
            hdr = struct.pack("!HHI", t, len(body) + 8, MAGIC) + self.tid
            crc = (zlib.crc32(hdr + body) ^ 0x5354554E) & 0xFFFFFFFF
            body += struct.pack("!HHI", FINGERPRINT, 4, crc)
        return struct.pack("!HHI", t, len(body), MAGIC) + self.tid + body

    def get(self, typ: int) -> bytes | None:
        for t, v in self.attrs:
            if t == typ:
                return v
        return None

    def get_all(self, typ: int) -> list[bytes]:
        return [v for t, v in self.attrs if t == typ]

    def error_code(self) -> int | None:
        v = self.get(ERROR_CODE)
        if v is None or len(v) < 4:
            return None
        return (v[2] & 7) * 100 + v[3]

    def xor_addr(self, typ: int) -> tuple[str, int] | None:
        v = self.get(typ)
        return decode_xor_addr(v, self.tid) if v is not None else None

    def __repr__(self) -> str:
        return (
            f"Msg(method={self.method:#x}, cls={self.cls}, tid={self.tid.hex()}, "
            f"error={self.error_code()}, attrs={[hex(t) for t, _ in self.attrs]})"
        )


def parse(data: bytes) -> Msg | None:
    """Parse a STUN message; None if it is not one (ChannelData, garbage)."""
    if len(data) < 20 or data[0] >> 6 != 0 or data[4:8] != MAGIC_BYTES:
        return None
    t, length = struct.unpack("!HH", data[:4])
    if 20 + length != len(data):
        return None
    method, cls = split_type(t)
    m = Msg(method, cls, data[8:20])
    off = 20
    while off + 4 <= len(data):
        typ, alen = struct.unpack("!HH", data[off : off + 4])
        m.attrs.append((typ, data[off + 4 : off + 4 + alen]))
        off += 4 + alen + pad4(alen)
    return m


def verify_fingerprint(data: bytes) -> bool:
    if len(data) < 28:
        return False
    typ, alen = struct.unpack("!HH", data[-8:-4])
    if typ != FINGERPRINT or alen != 4:
        return False
    crc = (zlib.crc32(data[:-8]) ^ 0x5354554E) & 0xFFFFFFFF
    return struct.unpack("!I", data[-4:])[0] == crc


class TurnError(Exception):
    def __init__(self, resp: Msg | None, what: str):
        self.resp = resp
        self.code = resp.error_code() if resp is not None else None
        super().__init__(f"{what}: {resp!r}")


class RawTurnClient:
    """A long-term-credential TURN client over one UDP socket.

    Datagrams that are not the awaited response (Data indications, ChannelData) are queued in
    `self.inbox` so tests can inspect what the relay delivered.
    """

    def __init__(
        self,
        server: tuple[str, int],
        user: str,
        password: str,
        bind: tuple[str, int] | None = None,
        timeout: float = 2.0,
    ):
        self.server = server
        fam = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind(bind or (("::1" if fam == socket.AF_INET6 else "127.0.0.1"), 0))
        self.user = user
        self.password = password
        self.realm: str | None = None
        self.nonce: bytes | None = None
        self.key: bytes | None = None
        self.timeout = timeout
        self.inbox: list[bytes] = []
        self.relayed: tuple[str, int] | None = None
        self.relayed_all: list[tuple[str, int]] = []
        self.mapped: tuple[str, int] | None = None
        self.lifetime: int | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    # -- transport ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def transact(self, req: Msg, key: bytes | None, fingerprint: bool = True) -> Msg | None:
        """Send a request (retransmitting twice) and return the response with its tid."""
        data = req.encode(key, fingerprint)
        deadline = time.monotonic() + self.timeout
        resend_at = time.monotonic()
        interval = 0.25
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= resend_at:
                self.send_raw(data)
                resend_at = now + interval
                interval *= 2
            self.sock.settimeout(max(0.01, min(resend_at, deadline) - now))
            try:
                d, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            m = parse(d)
            if m is not None and m.tid == req.tid and m.cls in (SUCCESS, ERROR):
                return m
            self.inbox.append(d)

    def request(self, method: int, attrs=(), fingerprint: bool = True) -> Msg:
        """An authenticated request; handles the 401 challenge and 438 stale nonce once."""
        for _ in range(3):
            m = Msg(method, REQUEST)
            for t, v in attrs:
                if callable(v):
                    v = v(m.tid)
                m.add(t, v)
            if self.key is not None:
                m.add(USERNAME, self.user.encode())
                m.add(REALM, self.realm.encode())
                m.add(NONCE, self.nonce)
            resp = self.transact(m, self.key, fingerprint)
            if resp is None:
                raise TurnError(None, f"no response to method {method:#x}")
            code = resp.error_code()
            if resp.cls == ERROR and code in (401, 438) and resp.get(NONCE) is not None:
                if code == 401 and self.key is not None:
                    return resp  # the credentials were refused
                self.nonce = resp.get(NONCE)
                self.realm = (resp.get(REALM) or self.realm.encode()).decode()
                self.key = long_term_key(self.user, self.realm, self.password)
                continue
            return resp
        return resp

    # -- TURN operations ------------------------------------------------------------------

    def allocate(self, family: int | None = None, lifetime: int | None = None, check=True) -> Msg:
        attrs = [(REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))]
        if family is not None:
            attrs.append((REQUESTED_ADDRESS_FAMILY, bytes([family, 0, 0, 0])))
        if lifetime is not None:
            attrs.append((LIFETIME, struct.pack("!I", lifetime)))
        resp = self.request(ALLOCATE, attrs)
        if resp.cls == SUCCESS:
            self.relayed_all = [
                decode_xor_addr(v, resp.tid) for v in resp.get_all(XOR_RELAYED_ADDRESS)
            ]
            self.relayed = self.relayed_all[0] if self.relayed_all else None
            self.mapped = resp.xor_addr(XOR_MAPPED_ADDRESS)
            lt = resp.get(LIFETIME)
            self.lifetime = struct.unpack("!I", lt)[0] if lt else None
        elif check:
            raise TurnError(resp, "Allocate failed")
        return resp

    def refresh(self, lifetime: int) -> Msg:
        return self.request(REFRESH, [(LIFETIME, struct.pack("!I", lifetime))])

    def create_permission(self, *peers: tuple[str, int]) -> Msg:
        return self.request(
            CREATE_PERMISSION,
            [(XOR_PEER_ADDRESS, (lambda tid, p=p: encode_xor_addr(p, tid))) for p in peers],
        )

    def channel_bind(self, number: int, peer: tuple[str, int]) -> Msg:
        return self.request(
            CHANNEL_BIND,
            [
                (CHANNEL_NUMBER, struct.pack("!HH", number, 0)),
                (XOR_PEER_ADDRESS, lambda tid: encode_xor_addr(peer, tid)),
            ],
        )

    def send_indication(self, peers: list[tuple[str, int]] | tuple[str, int], data: bytes) -> None:
        if isinstance(peers, tuple):
            peers = [peers]
        m = Msg(SEND, INDICATION)
        for p in peers:
            m.add_xor(XOR_PEER_ADDRESS, p)
        m.add(DATA_ATTR, data)
        self.send_raw(m.encode(None, fingerprint=False))

    def send_channel(self, number: int, data: bytes) -> None:
        self.send_raw(struct.pack("!HH", number, len(data)) + data + b"\0" * pad4(len(data)))

    def receive(self, timeout: float) -> list[tuple[str, object, bytes]]:
        """Collect relayed data for `timeout` seconds: ("data", peer, payload) for Data
        indications, ("chan", number, payload) for ChannelData, ("other", None, raw)."""
        out = []
        for d in self.inbox:
            out.append(self._classify(d))
        self.inbox.clear()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            self.sock.settimeout(left)
            try:
                d, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                return out
            out.append(self._classify(d))

    def receive_until(self, pred, timeout: float):
        """Wait until one received item satisfies pred; return it (or None)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for item in self.receive(min(left, 0.05)):
                if pred(item):
                    return item

    @staticmethod
    def _classify(d: bytes):
        if len(d) >= 4 and d[0] >> 6 == 1:
            number, length = struct.unpack("!HH", d[:4])
            return ("chan", number, d[4 : 4 + length])
        m = parse(d)
        if m is not None and m.method == DATA and m.cls == INDICATION:
            return ("data", m.xor_addr(XOR_PEER_ADDRESS), m.get(DATA_ATTR) or b"")
        return ("other", None, d)
