//! Cryptographic building blocks with the exact formats of the wire reference.
//!
//! - ECIES over secp256k1 (wire section 5.4), delegated to the `ecies` crate at the version
//!   Actrix locks, so tokens are byte-compatible with Actrix AIS and verifiers.
//! - The key-encryption key (KEK) that protects KS secret keys at rest: AES-256-GCM with a
//!   12-byte random nonce and the row's key id as associated data.
//! - base122 (wire section 6.2), written here because the published decoder panics on a
//!   code point with illegal-index 6 and allocates per character.
//! - The TURN long-term key (wire section 6.1).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use md5::{Digest, Md5};
use rand::RngCore;
use zeroize::Zeroizing;

/// Length of a KS secret key (big-endian scalar).
pub const SECRET_KEY_LEN: usize = 32;
/// Length of a compressed secp256k1 public key.
pub const PUBLIC_KEY_LEN: usize = 33;

/// The key-encryption key. Never printed.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

const KEK_NONCE_LEN: usize = 12;

impl Kek {
    /// A KEK from raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Kek(Zeroizing::new(bytes))
    }

    /// Parse 64 hex characters, or base64 (standard or URL-safe, padded or not) of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let mut out = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode_to_slice(text, out.as_mut()).map_err(|_| "is not valid hex".to_owned())?;
            return Ok(Kek(out));
        }
        if text.len() == 43 || text.len() == 44 {
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            for engine in engines {
                if let Ok(v) = engine.decode(text) {
                    let v = Zeroizing::new(v);
                    if v.len() == 32 {
                        out.copy_from_slice(&v);
                        return Ok(Kek(out));
                    }
                }
            }
        }
        Err("must be 64 hex characters or base64 of exactly 32 bytes".to_owned())
    }

    /// Encrypt `plaintext` bound to `aad`: `nonce(12) ‖ ciphertext ‖ tag(16)`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = Aes256Gcm::new_from_slice(self.0.as_ref()).map_err(|_| CryptoError)?;
        let mut nonce = [0u8; KEK_NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError)?;
        let mut out = Vec::with_capacity(KEK_NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypt what [`Kek::seal`] produced with the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < KEK_NONCE_LEN + 16 {
            return Err(CryptoError);
        }
        let cipher = Aes256Gcm::new_from_slice(self.0.as_ref()).map_err(|_| CryptoError)?;
        let (nonce, ct) = sealed.split_at(KEK_NONCE_LEN);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError)
    }
}

/// An opaque cryptographic failure (bad key, bad tag, bad point). Deliberately carries no
/// detail: the reason a decryption failed must not leak to callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cryptographic operation failed")]
pub struct CryptoError;

/// A fresh secp256k1 key pair: (secret scalar, compressed public key).
pub fn generate_keypair() -> (Zeroizing<[u8; SECRET_KEY_LEN]>, [u8; PUBLIC_KEY_LEN]) {
    let sk = ecies::SecretKey::random(&mut rand::rngs::OsRng);
    let pk = ecies::PublicKey::from_secret_key(&sk);
    (Zeroizing::new(sk.serialize()), pk.serialize_compressed())
}

/// The compressed public key of a secret scalar.
pub fn public_from_secret(secret: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], CryptoError> {
    let sk = ecies::SecretKey::parse_slice(secret).map_err(|_| CryptoError)?;
    Ok(ecies::PublicKey::from_secret_key(&sk).serialize_compressed())
}

/// ECIES-encrypt `msg` to `public_key` (33-byte compressed or 65-byte uncompressed).
pub fn ecies_encrypt(public_key: &[u8], msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
    ecies::encrypt(public_key, msg).map_err(|_| CryptoError)
}

/// ECIES-decrypt `ciphertext` with the 32-byte `secret`. Rejects invalid points, truncated
/// input and modified tags.
pub fn ecies_decrypt(secret: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    // E(65) ‖ nonce(16) ‖ tag(16): anything shorter cannot be a token.
    if ciphertext.len() < 97 {
        return Err(CryptoError);
    }
    ecies::decrypt(secret, ciphertext)
        .map(Zeroizing::new)
        .map_err(|_| CryptoError)
}

/// TURN long-term key: MD5(username ":" realm ":" hex(psk)), hashing the raw username bytes
/// without SASLprep (wire section 6.1).
pub fn turn_key(username: &[u8], realm: &str, psk: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    let mut hex_buf = Zeroizing::new(vec![0u8; psk.len() * 2]);
    // Cannot fail: the buffer is exactly twice the input.
    if hex::encode_to_slice(psk, &mut hex_buf).is_ok() {
        h.update(&hex_buf[..]);
    }
    h.finalize().into()
}

/// base122 "illegal" 7-bit values, by index (wire section 6.2).
const B122_ILLEGALS: [u8; 6] = [0, 10, 13, 34, 38, 92];
const B122_SHORTENED: u8 = 7;

/// base122-encode (kevinAlbs variant, as base122-rs 0.1.4).
pub fn base122_encode(data: &[u8]) -> Vec<u8> {
    let total_bits = data.len() * 8;
    let mut out = Vec::with_capacity(total_bits / 7 + 2);
    let mut pos = 0usize; // bit position
    let get7 = |pos: &mut usize| -> Option<u8> {
        if *pos >= total_bits {
            return None;
        }
        let mut v = 0u8;
        for i in 0..7 {
            let bit_index = *pos + i;
            let bit = if bit_index < total_bits {
                (data[bit_index / 8] >> (7 - (bit_index % 8))) & 1
            } else {
                0
            };
            v = (v << 1) | bit;
        }
        *pos += 7;
        Some(v)
    };
    while let Some(bits) = get7(&mut pos) {
        match B122_ILLEGALS.iter().position(|&x| x == bits) {
            None => out.push(bits),
            Some(index) => {
                let (idx, payload) = match get7(&mut pos) {
                    Some(next) => (index as u8, next),
                    None => (B122_SHORTENED, bits),
                };
                out.push(0b1100_0010 | (idx << 2) | (payload >> 6));
                out.push(0b1000_0000 | (payload & 0b0011_1111));
            }
        }
    }
    out
}

/// Why a base122 string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base122Error {
    /// A byte sequence that is not a 1- or 2-byte UTF-8 sequence.
    InvalidSequence,
    /// A 2-byte code point with illegal-index 6, which no encoder produces.
    InvalidIndex,
}

/// base122-decode into `out` (cleared first). Only 1- and 2-byte UTF-8 sequences can come from
/// the encoder, so anything else is refused rather than guessed at.
pub fn base122_decode_into(input: &[u8], out: &mut Vec<u8>) -> Result<(), Base122Error> {
    out.clear();
    out.reserve(input.len() * 7 / 8 + 1);
    let mut acc: u16 = 0;
    let mut nbits: u32 = 0;
    let mut push7 = |v: u8, out: &mut Vec<u8>| {
        acc = (acc << 7) | u16::from(v & 0x7f);
        nbits += 7;
        if nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
            acc &= (1u16 << nbits) - 1;
        }
    };
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b < 0x80 {
            push7(b, out);
            i += 1;
        } else if (0xC2..=0xDF).contains(&b) {
            let c = *input.get(i + 1).ok_or(Base122Error::InvalidSequence)?;
            if c & 0xC0 != 0x80 {
                return Err(Base122Error::InvalidSequence);
            }
            let cp = (u16::from(b & 0x1F) << 6) | u16::from(c & 0x3F);
            let index = ((cp >> 8) & 7) as u8;
            if index != B122_SHORTENED {
                let illegal = *B122_ILLEGALS
                    .get(usize::from(index))
                    .ok_or(Base122Error::InvalidIndex)?;
                push7(illegal, out);
            }
            push7((cp & 127) as u8, out);
            i += 2;
        } else {
            return Err(Base122Error::InvalidSequence);
        }
    }
    Ok(())
}

/// base122-decode.
pub fn base122_decode(input: &[u8]) -> Result<Vec<u8>, Base122Error> {
    let mut out = Vec::new();
    base122_decode_into(input, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base122_vectors_a3() {
        let vectors = [
            ("", ""),
            ("41", "2040"),
            ("00", "c280"),
            ("0000006500000007deadbeef", "c280c28628c280c28377555b773c"),
            (
                "000102030405060708090a0b0c0d0e0f",
                "c28020201810c68603420110502c18ca870360",
            ),
        ];
        for (input, output) in vectors {
            let input = hex::decode(input).unwrap();
            let output = hex::decode(output).unwrap();
            assert_eq!(base122_encode(&input), output, "encode {input:02x?}");
            assert_eq!(
                base122_decode(&output).unwrap(),
                input,
                "decode {output:02x?}"
            );
        }
    }

    #[test]
    fn base122_round_trip_and_rejects() {
        for len in 0..64usize {
            let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
            assert_eq!(base122_decode(&base122_encode(&data)).unwrap(), data);
            let illegal: Vec<u8> = (0..len)
                .map(|i| [0u8, 10, 13, 34, 38, 92][i % 6] << 1)
                .collect();
            assert_eq!(base122_decode(&base122_encode(&illegal)).unwrap(), illegal);
        }
        // Index 6 (U+0680) would panic base122-rs 0.1.4; here it is refused.
        assert_eq!(
            base122_decode("\u{680}".as_bytes()),
            Err(Base122Error::InvalidIndex)
        );
        assert_eq!(
            base122_decode(&[0xe2, 0x82, 0xac]),
            Err(Base122Error::InvalidSequence)
        );
        assert_eq!(base122_decode(&[0xc2]), Err(Base122Error::InvalidSequence));
        assert_eq!(base122_decode(&[0xff]), Err(Base122Error::InvalidSequence));
    }

    #[test]
    fn kek_parse_and_aad_binding() {
        let hex_kek = "11".repeat(32);
        let k = Kek::parse(&hex_kek).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode([0x11u8; 32]);
        let k2 = Kek::parse(&b64).unwrap();
        let sealed = k.seal(b"secret", b"key:1").unwrap();
        assert_eq!(&k2.open(&sealed, b"key:1").unwrap()[..], b"secret");
        assert!(k.open(&sealed, b"key:2").is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(k.open(&flipped, b"key:1").is_err());
        assert!(Kek::parse("abc").is_err());
        assert!(Kek::parse(&"zz".repeat(32)).is_err());
        assert!(Kek::parse(&base64::engine::general_purpose::STANDARD.encode([1u8; 31])).is_err());
    }
}
