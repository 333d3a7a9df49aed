//! The AIS's Ed25519 signing keys for actr 0.4 credentials, with rotation, stored like the KS
//! stores its keys (`ks::store`): one SQLite file (`ais_signing.db`) in WAL mode with
//! `synchronous=FULL`, every secret sealed with the KEK (AES-256-GCM) with the row's key id and
//! verifying key as associated data, and a KEK check value so a store opened with another KEK
//! is refused before anything is served. A key is used to sign only after the transaction that
//! stored it committed, so every credential ever handed out names a key that survives SIGKILL
//! or a power cut (`control/tests/crash.rs`).
//!
//! Key lifecycle: the current key is the newest one; it signs until `key_refresh_ahead_secs`
//! before its `expires_at`, then a new one is generated (on demand or by the AIS's background
//! task; [`SigningKeys::rotate`] forces one). Every key stays known to verifiers until
//! `expires_at + tolerance_seconds`, and a credential is never issued past that instant, so a
//! credential always outlives neither its key nor the verifiers' ability to check it. Rows
//! past that instant are purged.
//!
//! The same store keeps the renewal-token MAC key (sealed the same way) and the set of
//! consumed renewal tokens (for replay protection), both committed before the answer leaves.
//!
//! What this is not: no HTTP, no protobuf, no clock: every function that needs the time takes
//! `now_unix` first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use zeroize::Zeroizing;

use crate::crypto::Kek;
use crate::error::ControlError;

const KEK_CHECK_NAME: &str = "kek_check";
const KEK_CHECK_PLAINTEXT: &[u8] = b"actrix ais signing store KEK check v1";
const KEK_CHECK_AAD: &[u8] = b"actrix-ais-signing-kek-check-v1";
const RENEWAL_SECRET_NAME: &str = "renewal_secret";
const RENEWAL_SECRET_AAD: &[u8] = b"actrix-ais-renewal-secret-v1";

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

fn secret_aad(key_id: i64, verifying_key: &[u8]) -> Vec<u8> {
    format!(
        "actrix-ais-signing-v1:{key_id}:{}",
        hex::encode(verifying_key)
    )
    .into_bytes()
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// SQLite or I/O failure; nothing was signed or acknowledged.
    #[error("signing key storage failure: {0}")]
    Storage(String),
    /// A stored secret does not decrypt (tampered row or wrong KEK).
    #[error("stored signing key does not decrypt")]
    Corrupt,
}

impl From<rusqlite::Error> for SigningError {
    fn from(e: rusqlite::Error) -> Self {
        SigningError::Storage(e.to_string())
    }
}

/// Why a signature does not verify, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No key with this id (never issued here, or purged).
    #[error("unknown signing key id")]
    UnknownKey,
    /// The key is past `expires_at + tolerance`.
    #[error("signing key expired")]
    KeyExpired,
    /// The signature is not 64 bytes or does not verify.
    #[error("invalid signature")]
    BadSignature,
}

/// The public half of a signing key with its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: u32,
    pub verifying_key: [u8; 32],
    /// Unix seconds; the key signs only before `expires_at - refresh_ahead`.
    pub expires_at: u64,
    /// Seconds after `expires_at` during which signatures still verify.
    pub tolerance_seconds: u64,
}

impl KeyInfo {
    /// The last Unix second at which a signature of this key verifies.
    pub fn verifiable_until(&self) -> u64 {
        self.expires_at.saturating_add(self.tolerance_seconds)
    }

    /// Wire section 5.4's `in_tolerance`, for 0.4 keys: past `expires_at`, not past the grace.
    pub fn in_tolerance(&self, now_unix: u64) -> bool {
        self.expires_at < now_unix && now_unix <= self.verifiable_until()
    }
}

struct Key {
    info: KeyInfo,
    signing: SigningKey,
}

/// The signing keys (in memory, all of them: there are a handful) over the SQLite file.
pub struct SigningKeys {
    conn: Mutex<Connection>,
    rotate_lock: Mutex<()>,
    keys: RwLock<BTreeMap<u32, Key>>,
    renewal_secret: Zeroizing<[u8; 32]>,
    kek: Kek,
    key_ttl_seconds: u64,
    tolerance_seconds: u64,
    refresh_ahead_seconds: u64,
    path: PathBuf,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("path", &self.path)
            .field("key_ttl_seconds", &self.key_ttl_seconds)
            .finish_non_exhaustive()
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SigningKeys {
    /// Open (or create) the store at `path`, sealed with `kek`. Refuses a store created with a
    /// different KEK. `key_ttl_seconds` is the signing lifetime of a new key, `tolerance` how
    /// long its signatures verify after that, `refresh_ahead` how long before `expires_at` a
    /// successor takes over.
    pub fn open(
        path: &Path,
        kek: &Kek,
        key_ttl_seconds: u64,
        tolerance_seconds: u64,
        refresh_ahead_seconds: u64,
    ) -> Result<Self, ControlError> {
        let mut conn = crate::db::open(path)?;
        let db = |e: rusqlite::Error| ControlError::db(path, e);
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS ais_signing_keys (
                 key_id        INTEGER PRIMARY KEY AUTOINCREMENT,
                 verifying_key BLOB NOT NULL,
                 secret_sealed BLOB NOT NULL,
                 created_at    INTEGER NOT NULL,
                 expires_at    INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS ais_signing_meta (
                 name  TEXT PRIMARY KEY,
                 value BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS ais_renewal_consumed (
                 token_hash BLOB PRIMARY KEY,
                 expires_at INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(db)?;
        crate::db::restrict_permissions(path);
        let meta = |conn: &Connection, name: &str| -> Result<Option<Vec<u8>>, ControlError> {
            conn.query_row(
                "SELECT value FROM ais_signing_meta WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
        };
        let kek_refused = |message: &str| ControlError::Kek {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        // KEK check value and renewal secret: created together, in one transaction.
        match meta(&conn, KEK_CHECK_NAME)? {
            Some(sealed) => {
                let ok = kek
                    .open(&sealed, KEK_CHECK_AAD)
                    .map(|p| &p[..] == KEK_CHECK_PLAINTEXT)
                    .unwrap_or(false);
                if !ok {
                    return Err(kek_refused(
                        "the configured KEK is not the one this signing key store was created with; refusing to start",
                    ));
                }
            }
            None => {
                let n: i64 = conn
                    .query_row("SELECT COUNT(*) FROM ais_signing_keys", [], |r| r.get(0))
                    .map_err(db)?;
                if n > 0 {
                    return Err(kek_refused(
                        "holds signing keys but no KEK check value; refusing to guess",
                    ));
                }
                let mut secret = Zeroizing::new([0u8; 32]);
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, secret.as_mut());
                let check = kek
                    .seal(KEK_CHECK_PLAINTEXT, KEK_CHECK_AAD)
                    .map_err(|e| ControlError::db(path, e))?;
                let sealed_secret = kek
                    .seal(&secret[..], RENEWAL_SECRET_AAD)
                    .map_err(|e| ControlError::db(path, e))?;
                let tx = conn.transaction().map_err(db)?;
                tx.execute(
                    "INSERT INTO ais_signing_meta (name, value) VALUES (?1, ?2), (?3, ?4)",
                    params![KEK_CHECK_NAME, check, RENEWAL_SECRET_NAME, sealed_secret],
                )
                .map_err(db)?;
                tx.commit().map_err(db)?;
            }
        }
        let sealed = meta(&conn, RENEWAL_SECRET_NAME)?
            .ok_or_else(|| kek_refused("the renewal secret is missing"))?;
        let plain = kek
            .open(&sealed, RENEWAL_SECRET_AAD)
            .map_err(|_| kek_refused("the renewal secret does not decrypt"))?;
        let renewal_secret: [u8; 32] = plain[..]
            .try_into()
            .map_err(|_| kek_refused("the renewal secret has the wrong length"))?;

        let mut keys = BTreeMap::new();
        {
            let mut stmt = conn
                .prepare(
                    "SELECT key_id, verifying_key, secret_sealed, expires_at FROM ais_signing_keys",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(db)?;
            for row in rows {
                let (id, vk, sealed, expires_at) = row.map_err(db)?;
                let key = Self::unseal(kek, id, &vk, &sealed, expires_at, tolerance_seconds)
                    .map_err(|e| ControlError::db(path, format!("signing key {id}: {e}")))?;
                keys.insert(key.info.key_id, key);
            }
        }
        Ok(SigningKeys {
            conn: Mutex::new(conn),
            rotate_lock: Mutex::new(()),
            keys: RwLock::new(keys),
            renewal_secret: Zeroizing::new(renewal_secret),
            kek: kek.clone(),
            key_ttl_seconds,
            tolerance_seconds,
            refresh_ahead_seconds,
            path: path.to_owned(),
        })
    }

    fn unseal(
        kek: &Kek,
        id: i64,
        vk: &[u8],
        sealed: &[u8],
        expires_at: i64,
        tolerance_seconds: u64,
    ) -> Result<Key, SigningError> {
        let plain = kek
            .open(sealed, &secret_aad(id, vk))
            .map_err(|_| SigningError::Corrupt)?;
        let seed: [u8; 32] = plain[..].try_into().map_err(|_| SigningError::Corrupt)?;
        let signing = SigningKey::from_bytes(&seed);
        if signing.verifying_key().as_bytes()[..] != vk[..] {
            return Err(SigningError::Corrupt);
        }
        Ok(Key {
            info: KeyInfo {
                key_id: u32::try_from(id).map_err(|_| SigningError::Corrupt)?,
                verifying_key: *signing.verifying_key().as_bytes(),
                expires_at: u64::try_from(expires_at).unwrap_or(0),
                tolerance_seconds,
            },
            signing,
        })
    }

    /// The MAC key of renewal tokens.
    pub(crate) fn renewal_secret(&self) -> &[u8; 32] {
        &self.renewal_secret
    }

    fn usable(&self, now_unix: u64, info: &KeyInfo) -> bool {
        now_unix.saturating_add(self.refresh_ahead_seconds) < info.expires_at
    }

    /// The key that signs at `now_unix`, if the newest key is still before its hand-over.
    pub fn current(&self, now_unix: u64) -> Option<KeyInfo> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.values()
            .next_back()
            .map(|k| k.info)
            .filter(|i| self.usable(now_unix, i))
    }

    /// Generate, seal and durably store a new key at `now_unix`, and make it current. Returns
    /// only after the commit.
    pub fn rotate(&self, now_unix: u64) -> Result<KeyInfo, SigningError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
        let signing = SigningKey::from_bytes(&seed);
        let vk = *signing.verifying_key().as_bytes();
        let expires_at = now_unix.saturating_add(self.key_ttl_seconds.max(1));
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| SigningError::Storage("lock poisoned".into()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rowid = self
            .kek
            .insert_sealed(
                &tx,
                "ais_signing_keys",
                "verifying_key",
                &vk[..],
                &seed[..],
                (to_i64(now_unix), to_i64(expires_at)),
                |id| secret_aad(id, &vk),
            )?
            .map_err(|_| SigningError::Storage("encryption failed".into()))?;
        let key_id = u32::try_from(rowid)
            .map_err(|_| SigningError::Storage("key id space (u32) exhausted".into()))?;
        // Keys no signature of which can verify any more go.
        tx.execute(
            "DELETE FROM ais_signing_keys WHERE expires_at < ?1",
            params![to_i64(now_unix).saturating_sub(to_i64(self.tolerance_seconds))],
        )?;
        tx.execute(
            "DELETE FROM ais_renewal_consumed WHERE expires_at < ?1",
            params![to_i64(now_unix)],
        )?;
        tx.commit()?;
        drop(conn);
        let info = KeyInfo {
            key_id,
            verifying_key: vk,
            expires_at,
            tolerance_seconds: self.tolerance_seconds,
        };
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, k| now_unix <= k.info.verifiable_until());
        keys.insert(key_id, Key { info, signing });
        Ok(info)
    }

    /// The current key, rotating first when there is none or it is due. Blocking on a
    /// rotation (one fsync).
    pub fn current_or_rotate(&self, now_unix: u64) -> Result<KeyInfo, SigningError> {
        if let Some(k) = self.current(now_unix) {
            return Ok(k);
        }
        // Serialize rotations: the second caller finds the first one's key.
        let _one = self
            .rotate_lock
            .lock()
            .map_err(|_| SigningError::Storage("lock poisoned".into()))?;
        match self.current(now_unix) {
            Some(k) => Ok(k),
            None => self.rotate(now_unix),
        }
    }

    /// Sign `message` with key `key_id`.
    pub fn sign(&self, key_id: u32, message: &[u8]) -> Option<[u8; SIGNATURE_LEN]> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(&key_id)
            .map(|k| k.signing.sign(message).to_bytes())
    }

    /// The public half of `key_id`, while its signatures still verify at `now_unix`.
    pub fn key(&self, now_unix: u64, key_id: u32) -> Option<KeyInfo> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(&key_id)
            .map(|k| k.info)
            .filter(|i| now_unix <= i.verifiable_until())
    }

    /// Verify `signature` over `message` under `key_id` at `now_unix`.
    pub fn verify(
        &self,
        now_unix: u64,
        key_id: u32,
        message: &[u8],
        signature: &[u8],
    ) -> Result<KeyInfo, VerifyError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.get(&key_id).ok_or(VerifyError::UnknownKey)?;
        if now_unix > key.info.verifiable_until() {
            return Err(VerifyError::KeyExpired);
        }
        let sig: [u8; SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| VerifyError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        key.signing
            .verifying_key()
            .verify(message, &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(key.info)
    }

    /// Verify with a bare verifying key (what a client holding `signing_pubkey` does).
    pub fn verify_with(verifying_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
        let Ok(vk) = VerifyingKey::from_bytes(verifying_key) else {
            return false;
        };
        let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
            return false;
        };
        vk.verify(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }

    /// Record a renewal token (by hash) as consumed until `expires_at`. `Ok(false)` when it was
    /// consumed before (a replay). Committed before it returns.
    pub fn consume_renewal(
        &self,
        token_hash: &[u8; 32],
        expires_at: u64,
    ) -> Result<bool, SigningError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| SigningError::Storage("lock poisoned".into()))?;
        let n = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO ais_renewal_consumed (token_hash, expires_at) VALUES (?1, ?2)",
            )?
            .execute(params![&token_hash[..], to_i64(expires_at)])?;
        Ok(n == 1)
    }

    /// Every key whose signatures still verify at `now_unix`, oldest first.
    pub fn keys(&self, now_unix: u64) -> Vec<KeyInfo> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.values()
            .map(|k| k.info)
            .filter(|i| now_unix <= i.verifiable_until())
            .collect()
    }

    /// Rows in the key table (tests, health).
    pub fn stored_key_ids(&self) -> Result<Vec<u32>, SigningError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| SigningError::Storage("lock poisoned".into()))?;
        let mut stmt = conn.prepare("SELECT key_id FROM ais_signing_keys ORDER BY key_id")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .filter_map(Result::ok)
            .filter_map(|v| u32::try_from(v).ok())
            .collect();
        Ok(ids)
    }

    /// `PRAGMA integrity_check` (`"ok"` when healthy).
    pub fn integrity_check(&self) -> Result<String, SigningError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| SigningError::Storage("lock poisoned".into()))?;
        Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_767_225_600;

    fn open(dir: &Path, kek: u8) -> Result<SigningKeys, ControlError> {
        SigningKeys::open(
            &dir.join("s.db"),
            &Kek::from_bytes([kek; 32]),
            86_400,
            3600,
            600,
        )
    }

    #[test]
    fn rotation_keeps_old_keys_verifiable_until_their_grace_ends() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        assert!(s.current(T0).is_none());
        let k1 = s.current_or_rotate(T0).unwrap();
        assert_eq!(s.current_or_rotate(T0 + 10).unwrap(), k1);
        let sig = s.sign(k1.key_id, b"claims").unwrap();
        assert!(SigningKeys::verify_with(&k1.verifying_key, b"claims", &sig));
        // Hand-over 600 s before expiry: a new key signs, the old one still verifies.
        let later = k1.expires_at - 600;
        let k2 = s.current_or_rotate(later).unwrap();
        assert_ne!(k1.key_id, k2.key_id);
        assert!(s.verify(later, k1.key_id, b"claims", &sig).is_ok());
        assert!(k1.in_tolerance(k1.expires_at + 1));
        assert_eq!(
            s.verify(k1.verifiable_until() + 1, k1.key_id, b"claims", &sig),
            Err(VerifyError::KeyExpired)
        );
        assert_eq!(
            s.verify(later, k1.key_id, b"claimz", &sig),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            s.verify(later, 999, b"claims", &sig),
            Err(VerifyError::UnknownKey)
        );
        // Reopened: the same keys, the same renewal secret.
        let secret = *s.renewal_secret();
        drop(s);
        let s = open(dir.path(), 1).unwrap();
        assert_eq!(*s.renewal_secret(), secret);
        assert!(s.verify(later, k1.key_id, b"claims", &sig).is_ok());
        assert_eq!(s.current(later).unwrap().key_id, k2.key_id);
    }

    #[test]
    fn a_different_kek_is_refused_and_secrets_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        let k = s.rotate(T0).unwrap();
        drop(s);
        assert!(matches!(open(dir.path(), 2), Err(ControlError::Kek { .. })));
        // No stored column holds the seed in clear: the signature of a re-derived key differs.
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        let sealed: Vec<u8> = conn
            .query_row(
                "SELECT secret_sealed FROM ais_signing_keys WHERE key_id = ?1",
                params![k.key_id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(sealed.len(), 12 + 32 + 16);
    }

    #[test]
    fn a_renewal_token_is_consumed_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        let h = [7u8; 32];
        assert!(s.consume_renewal(&h, T0 + 100).unwrap());
        assert!(!s.consume_renewal(&h, T0 + 100).unwrap());
        drop(s);
        let s = open(dir.path(), 1).unwrap();
        assert!(!s.consume_renewal(&h, T0 + 100).unwrap(), "durable");
    }
}
