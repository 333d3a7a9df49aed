//! The Key Server's persistent key table.
//!
//! Durability: WAL with `synchronous=FULL`, and a key is returned to the caller only after its
//! transaction committed, so every acknowledged key survives SIGKILL or power loss (K8).
//!
//! Secrets at rest: AES-256-GCM under the KEK, with the key id and the public key as associated
//! data, so a ciphertext moved to another row does not decrypt (K10). A check value encrypted
//! under the KEK is kept in `ks_meta`; opening with a different KEK fails before any request is
//! served, instead of failing later on every lookup.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use zeroize::Zeroizing;

use crate::crypto::{self, Kek, PUBLIC_KEY_LEN, SECRET_KEY_LEN};
use crate::error::ControlError;

const KEK_CHECK_NAME: &str = "kek_check";
const KEK_CHECK_PLAINTEXT: &[u8] = b"actrix key store KEK check v1";
const KEK_CHECK_AAD: &[u8] = b"actrix-ks-kek-check-v1";
/// Run the lazy purge on every 100th generate, the first one included (as Actrix).
const PURGE_EVERY: u64 = 100;

/// A key id as issued by the KS (auto-incremented from 1).
pub type KeyId = u32;

/// Public half of a generated key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    /// Compressed secp256k1 point.
    pub public_key: [u8; PUBLIC_KEY_LEN],
    /// Unix seconds; 0 = never expires.
    pub expires_at: u64,
}

/// A secret key with its expiry. `Debug` does not print the secret.
#[derive(Clone)]
pub struct SecretRecord {
    pub key_id: KeyId,
    pub secret_key: Zeroizing<[u8; SECRET_KEY_LEN]>,
    /// Unix seconds; 0 = never expires.
    pub expires_at: u64,
    /// Grace period after `expires_at` during which the key is still served.
    pub tolerance_seconds: u64,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("key_id", &self.key_id)
            .field("expires_at", &self.expires_at)
            .field("tolerance_seconds", &self.tolerance_seconds)
            .finish_non_exhaustive()
    }
}

/// Key-store failure, mapped by the HTTP layer to 404 or 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such key, or expired beyond tolerance.
    #[error("key not found")]
    NotFound,
    /// The stored ciphertext does not decrypt (tampered, swapped, or wrong KEK).
    #[error("stored key does not decrypt")]
    Corrupt,
    /// SQLite or I/O failure (ENOSPC, EIO, ...). Nothing was returned to the caller.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

struct Inner {
    conn: Connection,
    generated: u64,
}

/// The KS key table.
pub struct KeyStore {
    inner: Mutex<Inner>,
    /// Decrypted secrets already served, so a hot key costs no SQLite read or AES-GCM open.
    /// Keys never change once stored; the expiry is re-checked on every hit. Bounded.
    cache: Mutex<std::collections::HashMap<KeyId, SecretRecord>>,
    kek: Kek,
    key_ttl_seconds: u64,
    tolerance_seconds: u64,
    path: PathBuf,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("key_ttl_seconds", &self.key_ttl_seconds)
            .field("tolerance_seconds", &self.tolerance_seconds)
            .finish_non_exhaustive()
    }
}

/// Most decrypted secrets kept in memory.
const SECRET_CACHE_CAPACITY: usize = 1024;

fn secret_aad(key_id: i64, public_key: &[u8]) -> Vec<u8> {
    format!("actrix-ks-secret-v1:{key_id}:{}", hex::encode(public_key)).into_bytes()
}

impl KeyStore {
    /// Open (or create) the key store at `path`. Refuses to open when `kek` is `None`, or when
    /// it differs from the KEK the store was created with.
    pub fn open(
        path: &Path,
        kek: Option<&Kek>,
        key_ttl_seconds: u64,
        tolerance_seconds: u64,
    ) -> Result<Self, ControlError> {
        let conn = crate::db::open(path)?;
        let db = |e: rusqlite::Error| ControlError::db(path, e);
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS ks_keys (
                 key_id        INTEGER PRIMARY KEY AUTOINCREMENT,
                 public_key    BLOB NOT NULL,
                 secret_sealed BLOB NOT NULL,
                 created_at    INTEGER NOT NULL,
                 expires_at    INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS ks_meta (
                 name  TEXT PRIMARY KEY,
                 value BLOB NOT NULL
             );",
        )
        .map_err(db)?;
        crate::db::restrict_permissions(path);

        let check: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM ks_meta WHERE name = ?1",
                params![KEK_CHECK_NAME],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let key_count: i64 = conn
            .query_row("SELECT COUNT(*) FROM ks_keys", [], |r| r.get(0))
            .map_err(db)?;
        let kek = match kek {
            Some(k) => k.clone(),
            None => {
                let message = if check.is_some() || key_count > 0 {
                    format!("holds {key_count} encrypted key(s) but no KEK is configured; set ks.kek, ks.kek_env or ks.kek_file")
                } else {
                    "a KEK is required (ks.kek, ks.kek_env or ks.kek_file)".to_owned()
                };
                return Err(ControlError::Kek {
                    path: path.to_owned(),
                    message,
                });
            }
        };
        match check {
            Some(sealed) => {
                let ok = kek
                    .open(&sealed, KEK_CHECK_AAD)
                    .map(|p| &p[..] == KEK_CHECK_PLAINTEXT)
                    .unwrap_or(false);
                if !ok {
                    return Err(ControlError::Kek {
                        path: path.to_owned(),
                        message: "the configured KEK is not the one this key store was created with; refusing to start".into(),
                    });
                }
            }
            None => {
                if key_count > 0 {
                    return Err(ControlError::Kek {
                        path: path.to_owned(),
                        message: "holds keys but no KEK check value; refusing to guess".into(),
                    });
                }
                let sealed = kek
                    .seal(KEK_CHECK_PLAINTEXT, KEK_CHECK_AAD)
                    .map_err(|e| ControlError::db(path, e))?;
                conn.execute(
                    "INSERT INTO ks_meta (name, value) VALUES (?1, ?2)",
                    params![KEK_CHECK_NAME, sealed],
                )
                .map_err(db)?;
            }
        }
        Ok(KeyStore {
            inner: Mutex::new(Inner { conn, generated: 0 }),
            cache: Mutex::new(std::collections::HashMap::new()),
            kek,
            key_ttl_seconds,
            tolerance_seconds,
            path: path.to_owned(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Storage("key store lock poisoned".into()))
    }

    /// Grace period after expiry.
    pub fn tolerance_seconds(&self) -> u64 {
        self.tolerance_seconds
    }

    /// Generate, encrypt and durably store a new key pair, created at `now_unix`. Returns
    /// only after the commit.
    pub fn generate(&self, now_unix: u64) -> Result<KeyRecord, StoreError> {
        let (secret, public_key) = crypto::generate_keypair();
        let expires_at = if self.key_ttl_seconds == 0 {
            0
        } else {
            now_unix.saturating_add(self.key_ttl_seconds)
        };
        let mut inner = self.lock()?;
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rowid = self
            .kek
            .insert_sealed(
                &tx,
                "ks_keys",
                "public_key",
                &public_key[..],
                &secret[..],
                (to_i64(now_unix), to_i64(expires_at)),
                |id| secret_aad(id, &public_key),
            )?
            .map_err(|_| StoreError::Storage("encryption failed".into()))?;
        let key_id = KeyId::try_from(rowid)
            .map_err(|_| StoreError::Storage("key id space (u32) exhausted".into()))?;
        tx.commit()?;

        let run_purge = inner.generated % PURGE_EVERY == 0;
        inner.generated += 1;
        if run_purge {
            if let Err(e) = Self::purge_locked(now_unix, &inner.conn, self.tolerance_seconds) {
                tracing::warn!(error = %e, "key store purge failed");
            }
        }
        Ok(KeyRecord {
            key_id,
            public_key,
            expires_at,
        })
    }

    /// The secret of `key_id` if it was served before and is still within its tolerance at
    /// `now_unix`. Never touches the disk and never waits on a writer: callable from the event
    /// loop.
    pub fn cached_secret(&self, now_unix: u64, key_id: KeyId) -> Option<SecretRecord> {
        let cache = self.cache.lock().ok()?;
        let rec = cache.get(&key_id)?;
        if rec.expires_at != 0 && now_unix > rec.expires_at.saturating_add(self.tolerance_seconds) {
            return None;
        }
        Some(rec.clone())
    }

    /// The secret key `key_id`, while `now_unix <= expires_at + tolerance` (or it never
    /// expires).
    pub fn get_secret(&self, now_unix: u64, key_id: KeyId) -> Result<SecretRecord, StoreError> {
        if let Some(rec) = self.cached_secret(now_unix, key_id) {
            return Ok(rec);
        }
        let rec = self.read_secret(now_unix, key_id)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= SECRET_CACHE_CAPACITY {
                cache.retain(|_, r| {
                    r.expires_at == 0
                        || now_unix <= r.expires_at.saturating_add(self.tolerance_seconds)
                });
                if cache.len() >= SECRET_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(key_id, rec.clone());
        }
        Ok(rec)
    }

    fn read_secret(&self, now_unix: u64, key_id: KeyId) -> Result<SecretRecord, StoreError> {
        let inner = self.lock()?;
        let row: Option<(Vec<u8>, Vec<u8>, i64)> = inner
            .conn
            .prepare_cached(
                "SELECT public_key, secret_sealed, expires_at FROM ks_keys WHERE key_id = ?1",
            )?
            .query_row(params![i64::from(key_id)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        drop(inner);
        let (public_key, sealed, expires_at) = row.ok_or(StoreError::NotFound)?;
        let expires_at = u64::try_from(expires_at).unwrap_or(0);
        if expires_at != 0 && now_unix > expires_at.saturating_add(self.tolerance_seconds) {
            return Err(StoreError::NotFound);
        }
        let plain = self
            .kek
            .open(&sealed, &secret_aad(i64::from(key_id), &public_key))
            .map_err(|_| StoreError::Corrupt)?;
        if plain.len() != SECRET_KEY_LEN {
            return Err(StoreError::Corrupt);
        }
        let mut secret_key = Zeroizing::new([0u8; SECRET_KEY_LEN]);
        secret_key.copy_from_slice(&plain);
        Ok(SecretRecord {
            key_id,
            secret_key,
            expires_at,
            tolerance_seconds: self.tolerance_seconds,
        })
    }

    /// Number of stored keys.
    pub fn key_count(&self) -> Result<u32, StoreError> {
        let inner = self.lock()?;
        let n: i64 = inner
            .conn
            .query_row("SELECT COUNT(*) FROM ks_keys", [], |r| r.get(0))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Delete keys expired beyond tolerance. Fixes Actrix's purge, which ignored tolerance
    /// (wire reference section 9, item 9).
    pub fn purge_expired(&self, now_unix: u64) -> Result<usize, StoreError> {
        let inner = self.lock()?;
        Self::purge_locked(now_unix, &inner.conn, self.tolerance_seconds)
    }

    fn purge_locked(now_unix: u64, conn: &Connection, tolerance: u64) -> Result<usize, StoreError> {
        let cutoff = to_i64(now_unix).saturating_sub(to_i64(tolerance));
        Ok(conn.execute(
            "DELETE FROM ks_keys WHERE expires_at > 0 AND expires_at < ?1",
            params![cutoff],
        )?)
    }

    /// `PRAGMA integrity_check` result (`"ok"` when healthy).
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
