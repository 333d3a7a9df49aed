//! Cryptographic building blocks with the exact formats of the wire reference.
//!
//! - ECIES over secp256k1 (wire section 5.4) in the format of the `ecies` crate 0.2.9 that
//!   Actrix locks (uncompressed ephemeral key ‖ 16-byte nonce ‖ tag ‖ AES-256-GCM ciphertext,
//!   key = HKDF-SHA256(ephemeral ‖ shared point, both uncompressed)), computed with the C
//!   libsecp256k1 (`secp256k1` crate): about four times faster than the pure-Rust curve the
//!   `ecies` crate uses, which bounds AIS registrations per second. The tests check both
//!   directions against the `ecies` crate itself and its published vector.
//! - The key-encryption key (KEK) that protects KS secret keys at rest: AES-256-GCM with a
//!   12-byte random nonce and the row's key id as associated data.
//! - base122 (wire section 6.2), re-exported from `actrix_proto::base122`.
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

    /// Store a key row whose sealed secret names the row's own id in its associated data: the
    /// row goes into `table` (columns `public_col`, `secret_sealed`, `created_at`,
    /// `expires_at`) with an empty ciphertext, and is completed in the same transaction once
    /// its id (the input of `aad`) is known. The outer error is the database's, the inner the
    /// encryption's; nothing is written unless the caller commits `tx`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_sealed(
        &self,
        tx: &rusqlite::Transaction<'_>,
        table: &str,
        public_col: &str,
        public: &[u8],
        secret: &[u8],
        (created_at, expires_at): (i64, i64),
        aad: impl FnOnce(i64) -> Vec<u8>,
    ) -> rusqlite::Result<Result<i64, CryptoError>> {
        tx.execute(
            &format!(
                "INSERT INTO {table} ({public_col}, secret_sealed, created_at, expires_at)
                 VALUES (?1, x'', ?2, ?3)"
            ),
            rusqlite::params![public, created_at, expires_at],
        )?;
        let rowid = tx.last_insert_rowid();
        let Ok(sealed) = self.seal(secret, &aad(rowid)) else {
            return Ok(Err(CryptoError));
        };
        tx.execute(
            &format!("UPDATE {table} SET secret_sealed = ?1 WHERE key_id = ?2"),
            rusqlite::params![sealed, rowid],
        )?;
        Ok(Ok(rowid))
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

/// The curve context (its precomputed tables are built once).
static SECP: std::sync::LazyLock<secp256k1::Secp256k1<secp256k1::All>> =
    std::sync::LazyLock::new(secp256k1::Secp256k1::new);

/// Uncompressed ephemeral public key, AES-GCM nonce and tag lengths of the ECIES format.
const ECIES_EPHEMERAL_LEN: usize = 65;
const ECIES_NONCE_LEN: usize = 16;
const ECIES_TAG_LEN: usize = 16;
const ECIES_OVERHEAD: usize = ECIES_EPHEMERAL_LEN + ECIES_NONCE_LEN + ECIES_TAG_LEN;

/// AES-256-GCM with the 16-byte nonce of the `ecies` crate's default configuration.
type EciesCipher = aes_gcm::AesGcm<aes_gcm::aes::Aes256, aes_gcm::aead::consts::U16>;

fn random_secret() -> secp256k1::SecretKey {
    loop {
        let mut b = Zeroizing::new([0u8; SECRET_KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(b.as_mut());
        // Fails only for zero or a value >= the group order (probability ~2^-128).
        if let Ok(sk) = secp256k1::SecretKey::from_byte_array(*b) {
            return sk;
        }
    }
}

/// A fresh secp256k1 key pair: (secret scalar, compressed public key).
pub fn generate_keypair() -> (Zeroizing<[u8; SECRET_KEY_LEN]>, [u8; PUBLIC_KEY_LEN]) {
    let sk = random_secret();
    let pk = secp256k1::PublicKey::from_secret_key(&SECP, &sk);
    (Zeroizing::new(sk.secret_bytes()), pk.serialize())
}

/// The compressed public key of a secret scalar.
pub fn public_from_secret(secret: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], CryptoError> {
    let sk = parse_secret(secret)?;
    Ok(secp256k1::PublicKey::from_secret_key(&SECP, &sk).serialize())
}

fn parse_secret(secret: &[u8]) -> Result<secp256k1::SecretKey, CryptoError> {
    let b: [u8; SECRET_KEY_LEN] = secret.try_into().map_err(|_| CryptoError)?;
    secp256k1::SecretKey::from_byte_array(b).map_err(|_| CryptoError)
}

/// HKDF-SHA256 (no salt, empty info) of `ephemeral ‖ shared`, both uncompressed.
fn ecies_key(
    ephemeral: &secp256k1::PublicKey,
    shared: &secp256k1::PublicKey,
) -> Zeroizing<[u8; 32]> {
    let mut master = Zeroizing::new([0u8; 2 * ECIES_EPHEMERAL_LEN]);
    master[..ECIES_EPHEMERAL_LEN].copy_from_slice(&ephemeral.serialize_uncompressed());
    master[ECIES_EPHEMERAL_LEN..].copy_from_slice(&shared.serialize_uncompressed());
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(None, &master[..])
        .expand(&[], key.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    key
}

/// ECIES-encrypt `msg` to `public_key` (33-byte compressed or 65-byte uncompressed).
pub fn ecies_encrypt(public_key: &[u8], msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
    use aes_gcm::aead::AeadInPlace;
    let receiver = secp256k1::PublicKey::from_slice(public_key).map_err(|_| CryptoError)?;
    let eph_sk = random_secret();
    let eph_pk = secp256k1::PublicKey::from_secret_key(&SECP, &eph_sk);
    let shared = receiver
        .mul_tweak(&SECP, &secp256k1::Scalar::from(eph_sk))
        .map_err(|_| CryptoError)?;
    let key = ecies_key(&eph_pk, &shared);
    let mut out = Vec::with_capacity(ECIES_OVERHEAD + msg.len());
    out.extend_from_slice(&eph_pk.serialize_uncompressed());
    let mut nonce = [0u8; ECIES_NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&[0u8; ECIES_TAG_LEN]);
    out.extend_from_slice(msg);
    let cipher = EciesCipher::new(key.as_ref().into());
    let tag = cipher
        .encrypt_in_place_detached(&nonce.into(), &[], &mut out[ECIES_OVERHEAD..])
        .map_err(|_| CryptoError)?;
    out[ECIES_EPHEMERAL_LEN + ECIES_NONCE_LEN..ECIES_OVERHEAD].copy_from_slice(&tag);
    Ok(out)
}

/// ECIES-decrypt `ciphertext` with the 32-byte `secret`. Rejects invalid points, truncated
/// input and modified tags.
pub fn ecies_decrypt(secret: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    use aes_gcm::aead::AeadInPlace;
    // E(65) ‖ nonce(16) ‖ tag(16): anything shorter cannot be a token.
    if ciphertext.len() < ECIES_OVERHEAD {
        return Err(CryptoError);
    }
    let sk = parse_secret(secret)?;
    let eph_pk = secp256k1::PublicKey::from_slice(&ciphertext[..ECIES_EPHEMERAL_LEN])
        .map_err(|_| CryptoError)?;
    let shared = eph_pk
        .mul_tweak(&SECP, &secp256k1::Scalar::from(sk))
        .map_err(|_| CryptoError)?;
    let key = ecies_key(&eph_pk, &shared);
    let nonce: [u8; ECIES_NONCE_LEN] = ciphertext
        [ECIES_EPHEMERAL_LEN..ECIES_EPHEMERAL_LEN + ECIES_NONCE_LEN]
        .try_into()
        .map_err(|_| CryptoError)?;
    let tag: [u8; ECIES_TAG_LEN] = ciphertext
        [ECIES_EPHEMERAL_LEN + ECIES_NONCE_LEN..ECIES_OVERHEAD]
        .try_into()
        .map_err(|_| CryptoError)?;
    let mut plain = Zeroizing::new(ciphertext[ECIES_OVERHEAD..].to_vec());
    EciesCipher::new(key.as_ref().into())
        .decrypt_in_place_detached(&nonce.into(), &[], &mut plain, &tag.into())
        .map_err(|_| CryptoError)?;
    Ok(plain)
}

/// TURN long-term key: MD5(username ":" realm ":" hex(psk)), hashing the raw username bytes
/// without SASLprep (wire section 6.1).
pub fn turn_key(username: &[u8], realm: &str, psk: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    long_term_input(&mut h, username, realm, psk);
    h.finalize().into()
}

/// The same long-term key for PASSWORD-ALGORITHM SHA-256 (RFC 8489 §18.5.1.2):
/// SHA-256(username ":" realm ":" hex(psk)).
pub fn turn_key_sha256(username: &[u8], realm: &str, psk: &[u8]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    long_term_input(&mut h, username, realm, psk);
    h.finalize().into()
}

fn long_term_input(h: &mut impl Digest, username: &[u8], realm: &str, psk: &[u8]) {
    h.update(username);
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    let mut hex_buf = Zeroizing::new(vec![0u8; psk.len() * 2]);
    // Cannot fail: the buffer is exactly twice the input.
    if hex::encode_to_slice(psk, &mut hex_buf).is_ok() {
        h.update(&hex_buf[..]);
    }
}

// base122 lives in the protocol crate (the data plane checks the shape of identity usernames
// with it, without allocating); these are its names here.
pub use actrix_proto::base122::{
    decode as base122_decode, decode_into as base122_decode_into, encode as base122_encode,
    Error as Base122Error,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.trim_start_matches("0x")).unwrap()
    }

    #[test]
    fn ecies_decrypts_the_published_vector() {
        // The `ecies` crate's own known-answer test (default configuration).
        let sk = unhex("e520872701d9ec44dbac2eab85512ad14ad0c42e01de56d7b528abd8524fcb47");
        let ct = unhex(
            "047be1885aeb48d4d4db0c992996725d3264784fef88c5b60782f8d0f940c213227fc3f904f846d5\
             ec3d0fba6653754501e8ebadc421aa3892a20fef33cff0206047058a4cfb4efbeae96b2d019b4ab2\
             edce33328748a0d008a69c8f5816b72d45bd9b5a41bb6ea0127ab23057ec6fcd",
        );
        assert_eq!(
            &ecies_decrypt(&sk, &ct).unwrap()[..],
            "hello world🌍".as_bytes()
        );
    }

    #[test]
    fn ecies_interoperates_with_the_ecies_crate_both_ways() {
        for len in [0usize, 1, 15, 16, 17, 200, 1000] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let (sk, pk) = generate_keypair();
            assert_eq!(public_from_secret(&sk[..]).unwrap(), pk);
            // Ours -> theirs.
            let ours = ecies_encrypt(&pk, &msg).unwrap();
            assert_eq!(ours.len(), 97 + len);
            assert_eq!(ecies::decrypt(&sk[..], &ours).unwrap(), msg);
            // Theirs -> ours, with a compressed and an uncompressed receiver key.
            let theirs = ecies::encrypt(&pk, &msg).unwrap();
            assert_eq!(&ecies_decrypt(&sk[..], &theirs).unwrap()[..], &msg[..]);
            let full = ecies::PublicKey::parse_compressed(&pk).unwrap().serialize();
            let ours = ecies_encrypt(&full, &msg).unwrap();
            assert_eq!(ecies::decrypt(&sk[..], &ours).unwrap(), msg);
            // Two encryptions of the same message differ (fresh ephemeral key and nonce).
            assert_ne!(ecies_encrypt(&pk, &msg).unwrap(), ours);
        }
    }

    #[test]
    fn ecies_rejects_tampering_wrong_keys_and_bad_points() {
        let (sk, pk) = generate_keypair();
        let (other, _) = generate_keypair();
        let ct = ecies_encrypt(&pk, b"claims").unwrap();
        assert!(ecies_decrypt(&other[..], &ct).is_err());
        for i in [0, 1, 64, 65, 80, 81, 96, 97, ct.len() - 1] {
            let mut t = ct.clone();
            t[i] ^= 1;
            assert!(ecies_decrypt(&sk[..], &t).is_err(), "flip at {i}");
        }
        assert!(ecies_decrypt(&sk[..], &ct[..96]).is_err());
        assert!(ecies_decrypt(&sk[..31], &ct).is_err());
        assert!(ecies_decrypt(&[0u8; 32], &ct).is_err());

        assert!(ecies_encrypt(&[9u8; 33], b"x").is_err());
        assert!(ecies_encrypt(&pk[..32], b"x").is_err());
    }

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
