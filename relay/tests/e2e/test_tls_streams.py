"""TURN over TLS with Python's ssl (OpenSSL) as the client: the protocol versions the
appliance refuses, and how it writes messages into records."""

from __future__ import annotations

import socket
import ssl
import warnings

import pytest

import turnwire as tw
from conftest import metric_sum, metrics


def modern_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.parametrize("backend", ["mmsg", "io_uring"])
def test_legacy_tls_is_refused_and_counted(appliance_factory, backend):
    """A client that offers TLS 1.0 or 1.1 only (RFC 8996 forbids both) fails its handshake
    with an alert, is counted as tls_incompatible, and a TLS 1.2 client on the same listener
    is served right after."""
    app = appliance_factory({"io": {"backend": backend}}, tls=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            old = modern_context()
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            old.minimum_version = version
            old.maximum_version = version
            with socket.create_connection((app.host, app.tls_port), timeout=5) as raw:
                with pytest.raises(ssl.SSLError):
                    old.wrap_socket(raw).do_handshake()
    m = metrics(app)
    assert metric_sum(m, "actrix_stream_closed_total", reason="tls_incompatible") == 2, m
    assert metric_sum(m, "actrix_stream_closed_total", reason="tls_error") == 0, m

    ctx = modern_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((app.host, app.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            assert s.version() == "TLSv1.2"
            req = tw.Msg(tw.BINDING, tw.REQUEST)
            s.sendall(req.encode(fingerprint=True))
            resp = tw.parse(s.recv(4096))
            assert resp is not None and resp.cls == tw.SUCCESS and resp.tid == req.tid


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_every_answer_is_a_record_of_its_own(appliance_factory, version):
    """Two Binding requests in one write: each answer comes in its own TLS record (an SSL_read
    returns at most one record), as clients that read one message per record need."""
    app = appliance_factory(tls=True)
    ctx = modern_context()
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection((app.host, app.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            reqs = [tw.Msg(tw.BINDING, tw.REQUEST) for _ in range(2)]
            s.sendall(b"".join(r.encode(fingerprint=True) for r in reqs))
            got = []
            while len(got) < 2:
                record = s.recv(65536)
                assert record, "closed before both answers"
                resp = tw.parse(record)
                # The whole read is one message: a second one would make the parse fail or
                # leave bytes over.
                assert resp is not None, record.hex()
                assert len(record) == 20 + int.from_bytes(record[2:4], "big")
                got.append(resp.tid)
            assert got == [r.tid for r in reqs]
