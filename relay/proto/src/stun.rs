//! STUN message codec (RFC 8489, with the TURN attributes of RFC 8656).
//!
//! Decoding borrows the datagram: [`Message::parse`] makes one validating pass over the
//! bytes, records where each attribute lives, and never copies. After it succeeds no accessor
//! can read out of bounds. Encoding writes into a caller-provided buffer through
//! [`MessageWriter`]; it never allocates and reports overflow as an error instead of panicking.
//!
//! This module knows nothing of sockets, clocks or TURN state.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use subtle::ConstantTimeEq;

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Attributes recorded per message. Real clients send fewer than 16; a message with more is
/// refused rather than stored in a growing list (no allocation on the receive path).
pub const MAX_ATTRS: usize = 32;

/// STUN/TURN methods (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 (TURN TCP allocations).
    pub const CONNECT: u16 = 0x00A;
    pub const CONNECTION_BIND: u16 = 0x00B;
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 8445).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// RFC 6062 §6.2.1.
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// RFC 8489 §14.16.
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
}

/// Error codes used by STUN and TURN (RFC 8489 §14.8, RFC 8656 §18).
pub mod code {
    pub const TRY_ALTERNATE: u16 = 300;
    pub const BAD_REQUEST: u16 = 400;
    pub const UNAUTHORIZED: u16 = 401;
    pub const FORBIDDEN: u16 = 403;
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    pub const ALLOCATION_MISMATCH: u16 = 437;
    pub const STALE_NONCE: u16 = 438;
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
    pub const WRONG_CREDENTIALS: u16 = 441;
    pub const UNSUPPORTED_TRANSPORT: u16 = 442;
    pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
    /// RFC 6062 §6.3.
    pub const CONNECTION_ALREADY_EXISTS: u16 = 446;
    pub const CONNECTION_TIMEOUT_OR_FAILURE: u16 = 447;
    pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
    pub const SERVER_ERROR: u16 = 500;
    pub const INSUFFICIENT_CAPACITY: u16 = 508;
}

/// Message class, encoded in bits C0/C1 of the message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// Compose the 14-bit message type from method and class (RFC 8489 §5).
pub const fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    let class_bits = match class {
        Class::Request => 0x000,
        Class::Indication => 0x010,
        Class::Success => 0x100,
        Class::Error => 0x110,
    };
    ((m & 0x0F80) << 2) | ((m & 0x0070) << 1) | (m & 0x000F) | class_bits
}

fn split_type(t: u16) -> (u16, Class) {
    let method = ((t & 0x3E00) >> 2) | ((t & 0x00E0) >> 1) | (t & 0x000F);
    let class = match t & 0x0110 {
        0x000 => Class::Request,
        0x010 => Class::Indication,
        0x100 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why a datagram is not an acceptable STUN message. Every variant means "discard".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    NotStun,
    BadLength,
    AttributeOverrun,
    TooManyAttributes,
    AttributeAfterFingerprint,
    BadFingerprint,
}

/// Position of one attribute inside the message buffer.
#[derive(Debug, Clone, Copy, Default)]
struct AttrPos {
    typ: u16,
    /// Offset of the attribute header (type) in the message.
    offset: u16,
    /// Length of the value, without padding.
    len: u16,
}

/// A parsed, borrowed STUN message.
///
/// Only the attributes an agent may act on are recorded: those before MESSAGE-INTEGRITY, then
/// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (RFC 8489 §14.5: "the agent MUST ignore all other
/// attributes that follow MESSAGE-INTEGRITY").
#[derive(Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    method: u16,
    class: Class,
    attrs: [AttrPos; MAX_ATTRS],
    n_attrs: usize,
    mi: Option<AttrPos>,
    mi256: Option<AttrPos>,
    fingerprint: Option<AttrPos>,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("method", &self.method)
            .field("class", &self.class)
            .field("len", &self.buf.len())
            .field("attrs", &self.n_attrs)
            .finish()
    }
}

/// True when the first bytes look like a STUN message (top bits 00 and the magic cookie).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf[0] & 0xC0 == 0
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
}

/// For stream transports: how many bytes the STUN message starting at `buf` needs in total, or
/// `None` when fewer than 4 bytes are present. Computed in `usize` so a length near 65535 can
/// never wrap to a small value (RFC 5769 negative vectors `neg-tcp-len-*`).
pub fn stream_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    Some(HEADER_LEN + u16::from_be_bytes([buf[2], buf[3]]) as usize)
}

impl<'a> Message<'a> {
    /// Parse one STUN message that fills `buf` exactly (one UDP datagram).
    ///
    /// Validates the header, the length, every attribute bound, and the FINGERPRINT value if
    /// present. MESSAGE-INTEGRITY is not checked here: it needs a key, see
    /// [`Message::verify_integrity`].
    pub fn parse(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        if !is_stun(buf) {
            return Err(DecodeError::NotStun);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        // RFC 8489 §5: the length is a multiple of 4 and excludes the header. A datagram holds
        // exactly one message, so the length must account for every byte present.
        if !len.is_multiple_of(4) || HEADER_LEN + len != buf.len() {
            return Err(DecodeError::BadLength);
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut msg = Message {
            buf,
            method,
            class,
            attrs: [AttrPos::default(); MAX_ATTRS],
            n_attrs: 0,
            mi: None,
            mi256: None,
            fingerprint: None,
        };
        let mut off = HEADER_LEN;
        while off < buf.len() {
            if msg.fingerprint.is_some() {
                // RFC 8489 §14.7: FINGERPRINT MUST be the last attribute.
                return Err(DecodeError::AttributeAfterFingerprint);
            }
            if off + 4 > buf.len() {
                return Err(DecodeError::AttributeOverrun);
            }
            let typ = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let alen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            let padded = (alen + 3) & !3;
            if off + 4 + padded > buf.len() {
                return Err(DecodeError::AttributeOverrun);
            }
            let pos = AttrPos {
                typ,
                offset: off as u16,
                len: alen as u16,
            };
            match typ {
                attr::FINGERPRINT => msg.fingerprint = Some(pos),
                attr::MESSAGE_INTEGRITY_SHA256 if msg.mi256.is_none() => msg.mi256 = Some(pos),
                attr::MESSAGE_INTEGRITY if msg.mi.is_none() && msg.mi256.is_none() => {
                    msg.mi = Some(pos)
                }
                _ if msg.mi.is_some() || msg.mi256.is_some() => {
                    // Ignored: after an integrity attribute only MI-SHA256 and FINGERPRINT
                    // count.
                }
                _ => {
                    if msg.n_attrs == MAX_ATTRS {
                        return Err(DecodeError::TooManyAttributes);
                    }
                    msg.attrs[msg.n_attrs] = pos;
                    msg.n_attrs += 1;
                }
            }
            off += 4 + padded;
        }
        if let Some(fp) = msg.fingerprint {
            if fp.len != 4 {
                return Err(DecodeError::BadFingerprint);
            }
            let at = fp.offset as usize;
            let want = crc32fast::hash(&buf[..at]) ^ FINGERPRINT_XOR;
            let got = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
            if want != got {
                return Err(DecodeError::BadFingerprint);
            }
        }
        Ok(msg)
    }

    pub fn method(&self) -> u16 {
        self.method
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn transaction_id(&self) -> &'a [u8; 12] {
        self.buf[8..20]
            .try_into()
            .expect("header length checked in parse")
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    pub fn has_integrity(&self) -> bool {
        self.mi.is_some() || self.mi256.is_some()
    }

    /// Which integrity attribute the message carries; SHA-256 wins when both are present.
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        if self.mi256.is_some() {
            Some(IntegrityKind::Sha256)
        } else if self.mi.is_some() {
            Some(IntegrityKind::Sha1)
        } else {
            None
        }
    }

    /// The value of the first attribute of type `typ` (RFC 8489 leaves duplicates undefined;
    /// the first one wins deterministically here, never the last).
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs[..self.n_attrs]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| self.value(a))
    }

    /// How many times attribute `typ` occurs (before integrity).
    pub fn count(&self, typ: u16) -> usize {
        self.attrs[..self.n_attrs]
            .iter()
            .filter(|a| a.typ == typ)
            .count()
    }

    /// All attribute values of type `typ`, in order.
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.attrs[..self.n_attrs]
            .iter()
            .filter(move |a| a.typ == typ)
            .map(|a| self.value(a))
    }

    /// Attribute types in message order (before integrity).
    pub fn attr_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.attrs[..self.n_attrs].iter().map(|a| a.typ)
    }

    fn value(&self, a: &AttrPos) -> &'a [u8] {
        let start = a.offset as usize + 4;
        &self.buf[start..start + a.len as usize]
    }

    /// Byte range of an attribute's value within the message, for in-place use.
    pub fn value_range(&self, typ: u16) -> Option<std::ops::Range<usize>> {
        self.attrs[..self.n_attrs]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| {
                let start = a.offset as usize + 4;
                start..start + a.len as usize
            })
    }

    pub fn get_u32(&self, typ: u16) -> Option<u32> {
        self.get(typ)
            .filter(|v| v.len() == 4)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// Decode an XOR-*-ADDRESS attribute. `None` when absent or malformed.
    pub fn get_xor_addr(&self, typ: u16) -> Option<Result<SocketAddr, BadAddress>> {
        self.get(typ)
            .map(|v| decode_xor_addr(v, self.transaction_id()))
    }

    /// Verify MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, with `key`.
    /// The comparison is constant-time. Returns false when neither is present.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if let Some(p) = self.mi256 {
            let len = p.len as usize;
            // RFC 8489 §14.6: at least 16 bytes, a multiple of 4, at most 32.
            if !(16..=32).contains(&len) || !len.is_multiple_of(4) {
                return false;
            }
            let mac = hmac_sha256_prefix(
                self.buf,
                p.offset as usize,
                p.offset as usize + 4 + len,
                key,
            );
            let got = self.value(&p);
            return bool::from(mac[..len].ct_eq(got));
        }
        if let Some(p) = self.mi {
            if p.len != 20 {
                return false;
            }
            let mac = hmac_sha1_prefix(self.buf, p.offset as usize, p.offset as usize + 24, key);
            return bool::from(mac.ct_eq(self.value(&p)));
        }
        false
    }
}

/// Which MESSAGE-INTEGRITY flavour a message used; responses answer with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    Sha1,
    Sha256,
}

/// HMAC over `msg[..upto]` with the header length rewritten to `covered_end - 20`, as RFC 8489
/// §14.5 prescribes for computing MESSAGE-INTEGRITY.
fn hmac_sha1_prefix(msg: &[u8], upto: usize, covered_end: usize, key: &[u8]) -> [u8; 20] {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&msg[..HEADER_LEN]);
    hdr[2..4].copy_from_slice(&((covered_end - HEADER_LEN) as u16).to_be_bytes());
    mac.update(&hdr);
    mac.update(&msg[HEADER_LEN..upto]);
    mac.finalize().into_bytes().into()
}

fn hmac_sha256_prefix(msg: &[u8], upto: usize, covered_end: usize, key: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&msg[..HEADER_LEN]);
    hdr[2..4].copy_from_slice(&((covered_end - HEADER_LEN) as u16).to_be_bytes());
    mac.update(&hdr);
    mac.update(&msg[HEADER_LEN..upto]);
    mac.finalize().into_bytes().into()
}

/// An address attribute with an unknown family or the wrong length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadAddress;

/// Decode an XOR-MAPPED/XOR-PEER/XOR-RELAYED-ADDRESS value (RFC 8489 §14.2).
pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, BadAddress> {
    if v.len() < 4 {
        return Err(BadAddress);
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        0x01 if v.len() == 8 => {
            let x = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        0x02 if v.len() == 20 => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(tid);
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = v[4 + i] ^ key[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => Err(BadAddress),
    }
}

/// Encode a plain (MAPPED-ADDRESS style) address value into `out`, returning its length (8 or
/// 20): what ALTERNATE-SERVER carries (RFC 8489 §14.15).
pub fn encode_addr(addr: SocketAddr, out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&ip.octets());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            out[4..20].copy_from_slice(&ip.octets());
            20
        }
    }
}

/// Encode an XOR address value into `out`, returning its length (8 or 20).
pub fn encode_xor_addr(addr: SocketAddr, tid: &[u8; 12], out: &mut [u8; 20]) -> usize {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    out[0] = 0;
    out[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(tid);
            let o = ip.octets();
            for i in 0..16 {
                out[4 + i] = o[i] ^ key[i];
            }
            20
        }
    }
}

/// The most bytes a Data indication puts before its payload: STUN header, XOR-PEER-ADDRESS
/// of an IPv6 peer, DATA attribute header.
pub const DATA_INDICATION_MAX_HEADER: usize = HEADER_LEN + 4 + 20 + 4;

/// Frame `buf[payload]` in place as a Data indication from `peer` (RFC 8656 §10.3): the
/// header, XOR-PEER-ADDRESS and the DATA attribute header are written into the bytes before
/// the payload, zero padding to a multiple of 4 after it. Returns the range of the whole
/// message, or `None` when the headroom, the tailroom or the 16-bit length cannot hold it.
pub fn frame_data_indication(
    buf: &mut [u8],
    payload: std::ops::Range<usize>,
    tid: &[u8; 12],
    peer: SocketAddr,
) -> Option<std::ops::Range<usize>> {
    let n = payload.len();
    let addr_len = if peer.is_ipv4() { 8 } else { 20 };
    let hdr_len = HEADER_LEN + 4 + addr_len + 4;
    let pad = (4 - n % 4) % 4;
    if payload.start < hdr_len
        || payload.end + pad > buf.len()
        || hdr_len + n + pad > u16::MAX as usize
    {
        return None;
    }
    let start = payload.start - hdr_len;
    let h = &mut buf[start..payload.start];
    let t = message_type(method::DATA, Class::Indication);
    h[0..2].copy_from_slice(&t.to_be_bytes());
    h[2..4].copy_from_slice(&((hdr_len - HEADER_LEN + n + pad) as u16).to_be_bytes());
    h[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    h[8..20].copy_from_slice(tid);
    h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
    let mut xa = [0u8; 20];
    encode_xor_addr(peer, tid, &mut xa);
    h[24..24 + addr_len].copy_from_slice(&xa[..addr_len]);
    let d = 24 + addr_len;
    h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    h[d + 2..d + 4].copy_from_slice(&(n as u16).to_be_bytes());
    buf[payload.end..payload.end + pad].fill(0);
    Some(start..payload.end + pad)
}

/// Parse an ERROR-CODE value into (code, reason).
pub fn decode_error_code(v: &[u8]) -> Option<(u16, &[u8])> {
    if v.len() < 4 {
        return None;
    }
    let class = (v[2] & 0x07) as u16;
    let num = v[3] as u16;
    if !(3..=6).contains(&class) || num > 99 {
        return None;
    }
    Some((class * 100 + num, &v[4..]))
}

/// The encoder ran out of room in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferFull;

/// Writes a STUN message into a caller-provided buffer. Padding is always zero-filled
/// (stale bytes in padding leak memory: the CVE-2020-4067 class).
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    pad: u8,
}

impl<'a> MessageWriter<'a> {
    pub fn new(
        buf: &'a mut [u8],
        method: u16,
        class: Class,
        tid: &[u8; 12],
    ) -> Result<Self, BufferFull> {
        if buf.len() < HEADER_LEN {
            return Err(BufferFull);
        }
        let t = message_type(method, class);
        debug_assert_eq!(t & 0x0110, class.bits());
        buf[0..2].copy_from_slice(&t.to_be_bytes());
        buf[2..4].copy_from_slice(&0u16.to_be_bytes());
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..20].copy_from_slice(tid);
        Ok(MessageWriter {
            buf,
            len: HEADER_LEN,
            pad: 0,
        })
    }

    /// Reproduce published test vectors whose padding is not zero. Never used for output.
    #[cfg(test)]
    pub(crate) fn set_padding_byte(&mut self, b: u8) {
        self.pad = b;
    }

    fn tid(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    fn set_len(&mut self, body: usize) {
        self.buf[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    }

    pub fn add(&mut self, typ: u16, value: &[u8]) -> Result<(), BufferFull> {
        let padded = (value.len() + 3) & !3;
        if value.len() > u16::MAX as usize || self.len + 4 + padded > self.buf.len() {
            return Err(BufferFull);
        }
        let o = self.len;
        self.buf[o..o + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[o + 2..o + 4].copy_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf[o + 4..o + 4 + value.len()].copy_from_slice(value);
        for b in &mut self.buf[o + 4 + value.len()..o + 4 + padded] {
            *b = self.pad;
        }
        self.len = o + 4 + padded;
        self.set_len(self.len - HEADER_LEN);
        Ok(())
    }

    pub fn add_u32(&mut self, typ: u16, v: u32) -> Result<(), BufferFull> {
        self.add(typ, &v.to_be_bytes())
    }

    pub fn add_xor_addr(&mut self, typ: u16, addr: SocketAddr) -> Result<(), BufferFull> {
        let mut v = [0u8; 20];
        let n = encode_xor_addr(addr, &self.tid(), &mut v);
        self.add(typ, &v[..n])
    }

    /// ERROR-CODE without a reason phrase: the phrase is optional, and leaving it out keeps
    /// error responses small (amplification, see the reliability checklist A5).
    pub fn add_error(&mut self, code: u16) -> Result<(), BufferFull> {
        let v = [0, 0, (code / 100) as u8, (code % 100) as u8];
        self.add(attr::ERROR_CODE, &v)
    }

    pub fn add_unknown_attributes(&mut self, types: &[u16]) -> Result<(), BufferFull> {
        let mut v = [0u8; 2 * 16];
        let n = types.len().min(16);
        for (i, t) in types[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.add(attr::UNKNOWN_ATTRIBUTES, &v[..2 * n])
    }

    /// Append MESSAGE-INTEGRITY (HMAC-SHA1) computed with `key`.
    pub fn add_integrity(&mut self, key: &[u8]) -> Result<(), BufferFull> {
        if self.len + 24 > self.buf.len() {
            return Err(BufferFull);
        }
        let mac = hmac_sha1_prefix(self.buf, self.len, self.len + 24, key);
        self.add(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Append MESSAGE-INTEGRITY-SHA256 (full 32 bytes) computed with `key`.
    pub fn add_integrity_sha256(&mut self, key: &[u8]) -> Result<(), BufferFull> {
        if self.len + 36 > self.buf.len() {
            return Err(BufferFull);
        }
        let mac = hmac_sha256_prefix(self.buf, self.len, self.len + 36, key);
        self.add(attr::MESSAGE_INTEGRITY_SHA256, &mac)
    }

    /// Append MESSAGE-INTEGRITY-SHA256 truncated to `len` bytes (RFC 8489 §14.6 allows 16 to
    /// 32, a multiple of 4, where a STUN usage permits it). For tests and peers that truncate;
    /// this server always sends the full 32 bytes.
    pub fn add_integrity_sha256_len(&mut self, key: &[u8], len: usize) -> Result<(), BufferFull> {
        let len = len.min(32);
        let padded = (len + 3) & !3;
        if self.len + 4 + padded > self.buf.len() {
            return Err(BufferFull);
        }
        let mac = hmac_sha256_prefix(self.buf, self.len, self.len + 4 + padded, key);
        self.add(attr::MESSAGE_INTEGRITY_SHA256, &mac[..len])
    }

    pub fn add_integrity_kind(
        &mut self,
        kind: IntegrityKind,
        key: &[u8],
    ) -> Result<(), BufferFull> {
        match kind {
            IntegrityKind::Sha1 => self.add_integrity(key),
            IntegrityKind::Sha256 => self.add_integrity_sha256(key),
        }
    }

    /// Append FINGERPRINT; it must be the last attribute.
    pub fn add_fingerprint(&mut self) -> Result<(), BufferFull> {
        if self.len + 8 > self.buf.len() {
            return Err(BufferFull);
        }
        self.set_len(self.len + 8 - HEADER_LEN);
        let crc = crc32fast::hash(&self.buf[..self.len]) ^ FINGERPRINT_XOR;
        self.add_u32(attr::FINGERPRINT, crc)
    }

    /// Total length written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn finish(self) -> usize {
        self.len
    }
}

/// Long-term credential key, RFC 8489 §9.2.2: MD5(username ":" realm ":" password).
pub fn long_term_key_md5(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// Long-term credential key for PASSWORD-ALGORITHM SHA-256 (RFC 8489 §18.5.1.2).
pub fn long_term_key_sha256(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// ChannelData message (RFC 8656 §12.4).
pub mod channel {
    /// Valid channel numbers (RFC 8656 §12).
    pub const MIN: u16 = 0x4000;
    pub const MAX: u16 = 0x4FFF;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ChannelError {
        TooShort,
        BadChannel,
        BadLength,
    }

    /// Parse a ChannelData header. Returns the channel number and the payload length. Over
    /// UDP the datagram may carry up to 3 padding bytes after the payload (RFC 8656 §12.5).
    pub fn parse(buf: &[u8]) -> Result<(u16, usize), ChannelError> {
        parse_range(buf, MAX)
    }

    /// As [`parse`], accepting channel numbers up to `max` (0x7FFF for the RFC 5766 range).
    pub fn parse_range(buf: &[u8], max: u16) -> Result<(u16, usize), ChannelError> {
        if buf.len() < 4 {
            return Err(ChannelError::TooShort);
        }
        let ch = u16::from_be_bytes([buf[0], buf[1]]);
        if !(MIN..=max.min(0x7FFF)).contains(&ch) {
            return Err(ChannelError::BadChannel);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if 4 + len > buf.len() {
            return Err(ChannelError::BadLength);
        }
        Ok((ch, len))
    }

    /// Bytes of a ChannelData header.
    pub const HEADER_LEN: usize = 4;

    /// Write a ChannelData header into `hdr`.
    pub fn write_header(hdr: &mut [u8; 4], ch: u16, len: u16) {
        hdr[..2].copy_from_slice(&ch.to_be_bytes());
        hdr[2..].copy_from_slice(&len.to_be_bytes());
    }

    /// Frame `buf[payload]` in place as ChannelData on channel `ch`: the header goes into
    /// the 4 bytes before the payload. `padded`: zero padding to a multiple of 4 goes into the
    /// bytes after it, as streams require (RFC 8656 §12.5: over TCP and TLS the message MUST
    /// be padded; over UDP padding is optional and left out). Returns the range of the whole
    /// message, or `None` without the headroom or tailroom, or when the payload is longer
    /// than the 16-bit length allows.
    pub fn frame_in_place(
        buf: &mut [u8],
        payload: std::ops::Range<usize>,
        ch: u16,
        padded: bool,
    ) -> Option<std::ops::Range<usize>> {
        let n = payload.len();
        let pad = if padded { (4 - n % 4) % 4 } else { 0 };
        if payload.start < HEADER_LEN || n > u16::MAX as usize || payload.end + pad > buf.len() {
            return None;
        }
        let start = payload.start - HEADER_LEN;
        let hdr: &mut [u8; 4] = (&mut buf[start..payload.start]).try_into().ok()?;
        write_header(hdr, ch, n as u16);
        buf[payload.end..payload.end + pad].fill(0);
        Some(start..payload.end + pad)
    }
}

/// Framing on stream transports (TCP, TLS): STUN messages and ChannelData back to back, the
/// latter padded to a multiple of 4 (RFC 8656 §12.5). A framer looks at the start of what it
/// has buffered and learns how long the next message is.
pub mod stream {
    use super::HEADER_LEN;

    /// What the bytes at the start of a stream buffer hold.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Frame {
        /// A complete STUN message of this many bytes.
        Stun(usize),
        /// A complete ChannelData message taking `total` bytes of the stream (header, payload
        /// and padding); the message itself, as a datagram, is the first `len` of them.
        ChannelData { len: usize, total: usize },
        /// More bytes are needed (at least this many in all).
        Incomplete(usize),
        /// Neither STUN nor ChannelData (first two bits 10 or 11), or longer than the limit:
        /// the stream cannot be resynchronised and must be closed.
        Invalid,
    }

    /// The next frame at the start of `buf`, accepting messages up to `max` bytes. Lengths are
    /// computed in `usize`, so a length near 65535 never wraps to a small value (RFC 5769
    /// negative vectors `neg-tcp-len-*`): it is incomplete until it arrives, or over `max`.
    pub fn next(buf: &[u8], max: usize) -> Frame {
        if buf.len() < 4 {
            return Frame::Incomplete(4);
        }
        let field = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let (need, frame) = match buf[0] >> 6 {
            0 => {
                let n = HEADER_LEN + field;
                (n, Frame::Stun(n))
            }
            1 => {
                let len = 4 + field;
                let total = len + (4 - field % 4) % 4;
                (total, Frame::ChannelData { len, total })
            }
            _ => return Frame::Invalid,
        };
        if need > max {
            Frame::Invalid
        } else if buf.len() < need {
            Frame::Incomplete(need)
        } else {
            frame
        }
    }
}

#[cfg(test)]
mod tests;
