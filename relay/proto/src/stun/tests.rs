//! Codec tests against the RFC 5769 / RFC 8489 vectors and the negative vectors in
//! `relay/tests/vectors/rfc5769-vectors.txt`, plus round-trip properties.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

const VECTORS: &str = include_str!("../../../tests/vectors/rfc5769-vectors.txt");

fn vectors() -> HashMap<String, HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut cur: Option<(String, HashMap<String, String>)> = None;
    for line in VECTORS.lines() {
        let line = line.trim_end();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if let Some((n, m)) = cur.take() {
                out.insert(n, m);
            }
            cur = Some((name.to_string(), HashMap::new()));
        } else if let Some((k, v)) = line.split_once(" = ") {
            if let Some((_, m)) = cur.as_mut() {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    if let Some((n, m)) = cur.take() {
        out.insert(n, m);
    }
    out
}

fn vec_bytes(name: &str) -> Vec<u8> {
    let v = vectors();
    hex::decode(&v[name]["hex"]).unwrap()
}

fn field(name: &str, key: &str) -> String {
    vectors()[name][key].clone()
}

#[test]
fn vector_file_is_complete() {
    let v = vectors();
    assert!(v.len() >= 60, "parsed {} vectors", v.len());
}

#[test]
fn rfc5769_2_1_request_decodes_verifies_and_reencodes() {
    let bytes = vec_bytes("rfc5769-2.1-sample-request");
    let m = Message::parse(&bytes).expect("parse");
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert!(m.has_fingerprint());
    assert_eq!(m.get(attr::USERNAME).unwrap(), b"evtj:h6vY");
    assert_eq!(m.get(attr::SOFTWARE).unwrap(), b"STUN test client");
    assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBu"));

    let mut buf = [0u8; 256];
    let tid: [u8; 12] = bytes[8..20].try_into().unwrap();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &tid).unwrap();
    w.set_padding_byte(0x20);
    w.add(attr::SOFTWARE, b"STUN test client").unwrap();
    w.add(attr::PRIORITY, &hex::decode("6e0001ff").unwrap())
        .unwrap();
    w.add(
        attr::ICE_CONTROLLED,
        &hex::decode("932ff9b151263b36").unwrap(),
    )
    .unwrap();
    w.add(attr::USERNAME, b"evtj:h6vY").unwrap();
    w.add_integrity(b"VOkJxbRl1RmTxUk/WvJxBt").unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&bytes));
}

#[test]
fn rfc5769_2_2_and_2_3_responses_decode_and_reencode() {
    for (name, addr) in [
        ("rfc5769-2.2-sample-ipv4-response", "192.0.2.1:32853"),
        (
            "rfc5769-2.3-sample-ipv6-response",
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ),
    ] {
        let bytes = vec_bytes(name);
        let m = Message::parse(&bytes).expect(name);
        assert_eq!(m.class(), Class::Success);
        let got = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap();
        assert_eq!(got, addr.parse::<SocketAddr>().unwrap(), "{name}");
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), "{name}");

        let mut buf = [0u8; 256];
        let tid: [u8; 12] = bytes[8..20].try_into().unwrap();
        let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Success, &tid).unwrap();
        w.set_padding_byte(0x20);
        w.add(attr::SOFTWARE, b"test vector").unwrap();
        w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, got).unwrap();
        w.add_integrity(b"VOkJxbRl1RmTxUk/WvJxBt").unwrap();
        w.add_fingerprint().unwrap();
        let n = w.finish();
        assert_eq!(hex::encode(&buf[..n]), hex::encode(&bytes), "{name}");
    }
}

#[test]
fn rfc5769_2_4_long_term_decodes_and_reencodes_byte_for_byte() {
    let name = "rfc5769-2.4-sample-request-long-term";
    let bytes = vec_bytes(name);
    let m = Message::parse(&bytes).unwrap();
    assert!(!m.has_fingerprint());
    let user = m.get(attr::USERNAME).unwrap();
    assert_eq!(user, "マトリックス".as_bytes());
    let realm = m.get(attr::REALM).unwrap();
    let nonce = m.get(attr::NONCE).unwrap();
    let key = long_term_key_md5(user, realm, b"TheMatrIX");
    assert_eq!(hex::encode(key), field(name, "hmac_key_md5_hex"));
    assert!(m.verify_integrity(&key));

    let mut buf = [0u8; 256];
    let tid: [u8; 12] = bytes[8..20].try_into().unwrap();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &tid).unwrap();
    w.add(attr::USERNAME, user).unwrap();
    w.add(attr::NONCE, nonce).unwrap();
    w.add(attr::REALM, realm).unwrap();
    w.add_integrity(&key).unwrap();
    let n = w.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&bytes));
}

#[test]
fn rfc8489_b1_errata_verifies_with_sha256_key_only_and_reencodes() {
    let name = "rfc8489-B.1-errata-6268";
    let bytes = vec_bytes(name);
    let m = Message::parse(&bytes).unwrap();
    assert_eq!(m.integrity_kind(), Some(IntegrityKind::Sha256));
    let realm = m.get(attr::REALM).unwrap();
    let user = "マトリックス".as_bytes();
    let key256 = long_term_key_sha256(user, realm, b"TheMatrIX");
    assert_eq!(hex::encode(key256), field(name, "hmac_key_sha256_hex"));
    assert!(m.verify_integrity(&key256));
    let key_md5 = long_term_key_md5(user, realm, b"TheMatrIX");
    assert!(!m.verify_integrity(&key_md5), "the MD5 key must fail");
    assert_eq!(
        m.get(attr::PASSWORD_ALGORITHM).unwrap(),
        &[0x00, 0x02, 0x00, 0x00]
    );

    let mut buf = [0u8; 256];
    let tid: [u8; 12] = bytes[8..20].try_into().unwrap();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &tid).unwrap();
    w.add(attr::USERHASH, m.get(attr::USERHASH).unwrap())
        .unwrap();
    w.add(attr::NONCE, m.get(attr::NONCE).unwrap()).unwrap();
    w.add(attr::REALM, realm).unwrap();
    w.add(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]).unwrap();
    w.add_integrity_sha256(&key256).unwrap();
    let n = w.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&bytes));
}

#[test]
fn rfc8489_b1_as_published_is_rejected() {
    let bytes = vec_bytes("rfc8489-B.1-as-published");
    assert_eq!(Message::parse(&bytes).unwrap_err(), DecodeError::BadLength);
}

#[test]
fn negative_vectors_get_the_behaviour_they_name() {
    // Discarded at decode.
    for (name, err) in [
        ("neg-req-byte27", DecodeError::BadFingerprint),
        (
            "neg-req-attr-after-fingerprint",
            DecodeError::AttributeAfterFingerprint,
        ),
        ("neg-req-length-too-long", DecodeError::BadLength),
        ("neg-req-length-not-multiple-of-4", DecodeError::BadLength),
        ("neg-req-truncated-19", DecodeError::TooShort),
        ("neg-req-bad-cookie", DecodeError::NotStun),
        ("neg-req-top-bits-set", DecodeError::NotStun),
        ("neg-req-attr-len-overrun", DecodeError::AttributeOverrun),
        ("neg-zero-header", DecodeError::NotStun),
    ] {
        assert_eq!(Message::parse(&vec_bytes(name)).unwrap_err(), err, "{name}");
    }
    // Decode fine, integrity fails: a request gets 401 (tested in the TURN core), never success.
    let m_bytes = vec_bytes("neg-req-mi-lastbit-fp-recomputed");
    let m = Message::parse(&m_bytes).unwrap();
    assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    let lt = vec_bytes("neg-lt-byte32");
    let m = Message::parse(&lt).unwrap();
    let key = hex::decode(field(
        "rfc5769-2.4-sample-request-long-term",
        "hmac_key_md5_hex",
    ))
    .unwrap();
    assert!(!m.verify_integrity(&key));
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let bytes = vec_bytes("neg-lt-lifetime-after-mi");
    let m = Message::parse(&bytes).unwrap();
    let key = hex::decode(field("neg-lt-lifetime-after-mi", "hmac_key_md5_hex")).unwrap();
    assert!(m.verify_integrity(&key), "HMAC covers only bytes before MI");
    assert_eq!(
        m.get(attr::LIFETIME),
        None,
        "the trailing LIFETIME must be invisible"
    );
}

#[test]
fn stream_framing_never_wraps() {
    for (name, need) in [
        ("neg-tcp-len-65520", 65540usize),
        ("neg-tcp-len-65524", 65544),
        ("neg-tcp-len-65528", 65548),
        ("neg-tcp-len-65532", 65552),
    ] {
        let b = vec_bytes(name);
        assert_eq!(stream_frame_len(&b), Some(need), "{name}");
        assert!(need > b.len(), "incomplete");
        // The stream framer: incomplete while the limit allows the message, invalid (close
        // the stream) when it does not; never a small length.
        assert_eq!(
            stream::next(&b, 70_000),
            stream::Frame::Incomplete(need),
            "{name}"
        );
        assert_eq!(stream::next(&b, 4096), stream::Frame::Invalid, "{name}");
    }
}

#[test]
fn stream_framer_splits_stun_and_padded_channel_data() {
    use stream::{next, Frame};
    assert_eq!(next(&[], 1500), Frame::Incomplete(4));
    assert_eq!(next(&[0x00, 0x01, 0x00], 1500), Frame::Incomplete(4));
    let mut binding = [0u8; 20];
    let n = MessageWriter::new(&mut binding, method::BINDING, Class::Request, &[1; 12])
        .unwrap()
        .finish();
    assert_eq!(n, 20);
    // Two messages back to back: the framer sees the first, complete.
    let mut two = binding.to_vec();
    two.extend_from_slice(&binding[..10]);
    assert_eq!(next(&two, 1500), Frame::Stun(20));
    assert_eq!(next(&two[20..], 1500), Frame::Incomplete(20));
    // ChannelData of 5 payload bytes: 9 bytes of message, 12 on the stream (padding).
    let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
    assert_eq!(next(&cd, 1500), Frame::ChannelData { len: 9, total: 12 });
    assert_eq!(next(&cd[..9], 1500), Frame::Incomplete(12));
    let aligned = [0x4F, 0xFF, 0x00, 0x04, 9, 9, 9, 9];
    assert_eq!(
        next(&aligned, 1500),
        Frame::ChannelData { len: 8, total: 8 }
    );
    // First bits 10 or 11: neither STUN nor ChannelData.
    assert_eq!(next(&[0x80, 0, 0, 0], 1500), Frame::Invalid);
    assert_eq!(next(&[0xC0, 0, 0, 0], 1500), Frame::Invalid);
    // Over the limit.
    assert_eq!(next(&[0x40, 0x00, 0x05, 0xDC], 1400), Frame::Invalid);
}

#[test]
fn channel_data_is_padded_in_place_only_toward_streams() {
    let mut buf = [0xEEu8; 4 + 5 + 4];
    buf[4..9].copy_from_slice(b"hello");
    let r = channel::frame_in_place(&mut buf, 4..9, 0x4001, false).unwrap();
    assert_eq!(
        &buf[r],
        &[0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o']
    );
    let mut buf = [0xEEu8; 4 + 5 + 4];
    buf[4..9].copy_from_slice(b"hello");
    let r = channel::frame_in_place(&mut buf, 4..9, 0x4001, true).unwrap();
    assert_eq!(
        &buf[r],
        &[0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0],
        "zero padding to a multiple of 4, never the old tailroom bytes"
    );
    // No tailroom for the padding: refused, not written past the buffer.
    let mut short = [0u8; 9];
    assert_eq!(
        channel::frame_in_place(&mut short, 4..9, 0x4001, true),
        None
    );
}

#[test]
fn turn_captures_decode() {
    let req = vec_bytes("turn-chrome-allocate-request-noauth");
    let m = Message::parse(&req).unwrap();
    assert_eq!((m.method(), m.class()), (method::ALLOCATE, Class::Request));
    assert_eq!(m.get(attr::REQUESTED_TRANSPORT).unwrap(), &[17, 0, 0, 0]);

    let r401 = vec_bytes("turn-coturn-401-response");
    let m = Message::parse(&r401).unwrap();
    assert_eq!(m.class(), Class::Error);
    let (c, _) = decode_error_code(m.get(attr::ERROR_CODE).unwrap()).unwrap();
    assert_eq!(c, 401);
    assert_eq!(m.get(attr::NONCE).unwrap(), b"5a0209b5cb806106");
    assert_eq!(m.get(attr::REALM).unwrap(), b"a1.cydev.ru");

    let auth = vec_bytes("turn-chrome-allocate-request-auth");
    let m = Message::parse(&auth).unwrap();
    assert_eq!(m.get(attr::USERNAME).unwrap(), b"ernado");
    assert!(m.has_integrity());

    let ok = vec_bytes("turn-coturn-allocate-success");
    let m = Message::parse(&ok).unwrap();
    assert_eq!(m.get_u32(attr::LIFETIME), Some(600));
    assert!(m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().is_ok());
    assert!(m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().is_ok());
}

#[test]
fn channel_data_vectors() {
    assert_eq!(
        channel::parse(&vec_bytes("turn-chandata-capture-1")).unwrap(),
        (0x4000, 100)
    );
    assert_eq!(
        channel::parse(&vec_bytes("turn-chandata-capture-2")).unwrap(),
        (0x4000, 547)
    );
    for (name, e) in [
        ("turn-chandata-neg-short", channel::ChannelError::TooShort),
        (
            "turn-chandata-neg-zeroes",
            channel::ChannelError::BadChannel,
        ),
        (
            "turn-chandata-neg-bad-channel",
            channel::ChannelError::BadChannel,
        ),
        (
            "turn-chandata-neg-bad-length",
            channel::ChannelError::BadLength,
        ),
    ] {
        assert_eq!(channel::parse(&vec_bytes(name)).unwrap_err(), e, "{name}");
    }
}

#[test]
fn odd_offsets_parse_identically() {
    // io_uring provided buffers and headroom can put a message at any offset.
    let bytes = vec_bytes("rfc5769-2.1-sample-request");
    let mut big = vec![0u8; bytes.len() + 7];
    for off in 0..7 {
        big[off..off + bytes.len()].copy_from_slice(&bytes);
        let m = Message::parse(&big[off..off + bytes.len()]).unwrap();
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert_eq!(m.get(attr::USERNAME).unwrap(), b"evtj:h6vY");
    }
}

#[test]
fn duplicate_attributes_first_wins() {
    let bytes = vec_bytes("turn-send-indication-duplicate-peer");
    let m = Message::parse(&bytes).unwrap();
    assert_eq!(m.count(attr::XOR_PEER_ADDRESS), 2);
    let first = m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap();
    assert_eq!(first, "8.8.8.8:5000".parse().unwrap());
}

#[test]
fn writer_reports_full_buffer_instead_of_panicking() {
    let mut buf = [0u8; 30];
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[0; 12]).unwrap();
    assert!(w.add(attr::SOFTWARE, &[0u8; 16]).is_err());
    assert!(w.add_integrity(b"k").is_err());
    let mut tiny = [0u8; 10];
    assert!(MessageWriter::new(&mut tiny, method::BINDING, Class::Request, &[0; 12]).is_err());
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
    ]
}

proptest! {
    #[test]
    fn roundtrip_encode_decode(
        tid in any::<[u8; 12]>(),
        method in prop_oneof![Just(method::BINDING), Just(method::ALLOCATE), Just(method::SEND), Just(method::CHANNEL_BIND)],
        class in prop_oneof![Just(Class::Request), Just(Class::Indication), Just(Class::Success), Just(Class::Error)],
        username in proptest::collection::vec(any::<u8>(), 0..64),
        data in proptest::collection::vec(any::<u8>(), 0..300),
        lifetime in any::<u32>(),
        peer in arb_addr(),
        key in proptest::collection::vec(any::<u8>(), 1..40),
        fp in any::<bool>(),
        sha256 in any::<bool>(),
    ) {
        let mut buf = [0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, method, class, &tid).unwrap();
        w.add(attr::USERNAME, &username).unwrap();
        w.add_u32(attr::LIFETIME, lifetime).unwrap();
        w.add_xor_addr(attr::XOR_PEER_ADDRESS, peer).unwrap();
        w.add(attr::DATA, &data).unwrap();
        if sha256 { w.add_integrity_sha256(&key).unwrap() } else { w.add_integrity(&key).unwrap() }
        if fp { w.add_fingerprint().unwrap() }
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(m.method(), method);
        prop_assert_eq!(m.class(), class);
        prop_assert_eq!(m.transaction_id(), &tid);
        prop_assert_eq!(m.get(attr::USERNAME).unwrap(), &username[..]);
        prop_assert_eq!(m.get_u32(attr::LIFETIME), Some(lifetime));
        prop_assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(), peer);
        prop_assert_eq!(m.get(attr::DATA).unwrap(), &data[..]);
        prop_assert!(m.verify_integrity(&key));
        prop_assert_eq!(m.has_fingerprint(), fp);
        // Padding is zero: every byte after a value up to the next 4-byte boundary.
        let mut flipped = buf[..n].to_vec();
        flipped[20 + 5] ^= 1; // inside USERNAME's value or length: integrity must fail
        if let Ok(m2) = Message::parse(&flipped) { prop_assert!(!m2.verify_integrity(&key)); }
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Message::parse(&bytes);
        let _ = channel::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_stunlike(mut bytes in proptest::collection::vec(any::<u8>(), 20..200)) {
        bytes[0] &= 0x3f;
        bytes[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        let l = (bytes.len() - 20) as u16;
        bytes[2..4].copy_from_slice(&l.to_be_bytes());
        if let Ok(m) = Message::parse(&bytes) {
            for t in m.attr_types().collect::<Vec<_>>() { let _ = m.get(t); }
            let _ = m.verify_integrity(b"key");
        }
    }
}
