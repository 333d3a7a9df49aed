//! nonce-auth request signing, exactly as wire reference section 4 describes.
//!
//! `signature = base64(HMAC-SHA256(shared_key, decimal(timestamp) ‖ nonce ‖ payload))`, standard
//! alphabet with padding. Verification order is fixed and must be kept: the timestamp window
//! (±60 s, inclusive), then the MAC (constant-time), then the nonce replay check. A request
//! with a bad signature therefore never consumes a nonce, and only holders of the shared key can
//! add rows to the nonce table.
//!
//! The nonce table is SQLite so that a replay is refused after a restart too (checklist K1). It
//! is bounded: past capacity the rows with the oldest request timestamps are evicted first,
//! which are the ones whose replays the window check already refuses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::error::ControlError;

/// Accepted clock skew, in seconds, both directions, inclusive.
pub const WINDOW_SECS: u64 = 60;
/// How long a seen nonce is remembered.
pub const NONCE_TTL_SECS: u64 = 300;
/// Longest accepted nonce (a UUID is 36 bytes). Longer ones are bad parameters.
pub const MAX_NONCE_LEN: usize = 128;

type HmacSha256 = Hmac<Sha256>;

/// The credential carried by a signed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceCredential {
    /// Unix seconds.
    pub timestamp: u64,
    /// Unique per request (UUID v4 by convention).
    pub nonce: String,
    /// Standard base64 (with padding) of the HMAC-SHA256.
    pub signature: String,
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The nonce is empty or too long (a parameter problem: HTTP 400).
    #[error("malformed credential")]
    Malformed,
    /// `|now - timestamp| > 60` (HTTP 401).
    #[error("timestamp out of window")]
    TimestampOutOfWindow,
    /// MAC mismatch or undecodable signature (HTTP 401).
    #[error("invalid signature")]
    InvalidSignature,
    /// The nonce was already used (HTTP 403).
    #[error("duplicate nonce")]
    DuplicateNonce,
    /// The nonce store failed (HTTP 500).
    #[error("nonce store failure: {0}")]
    Storage(String),
}

fn mac(secret: &[u8], timestamp: u64, nonce: &str, payload: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(timestamp.to_string().as_bytes());
    m.update(nonce.as_bytes());
    m.update(payload.as_bytes());
    m
}

/// Compute the signature string. `timestamp` is the credential's own field (Unix seconds), not
/// a reading of the clock.
#[must_use]
pub fn sign(secret: &[u8], timestamp: u64, nonce: &str, payload: &str) -> String {
    let tag = mac(secret, timestamp, nonce, payload)
        .finalize()
        .into_bytes();
    base64::engine::general_purpose::STANDARD.encode(tag)
}

/// A random UUID v4 string.
pub fn new_nonce() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Build a credential for `payload`, signed at `now_unix`.
#[must_use]
pub fn make_credential(now_unix: u64, secret: &[u8], payload: &str) -> NonceCredential {
    let nonce = new_nonce();
    let signature = sign(secret, now_unix, &nonce, payload);
    NonceCredential {
        timestamp: now_unix,
        nonce,
        signature,
    }
}

/// Steps 1 and 2 of the verification at `now_unix`: the window, then the MAC in constant time.
pub fn check_signature(
    now_unix: u64,
    secret: &[u8],
    cred: &NonceCredential,
    payload: &str,
) -> Result<(), AuthError> {
    if cred.nonce.is_empty() || cred.nonce.len() > MAX_NONCE_LEN {
        return Err(AuthError::Malformed);
    }
    if now_unix.abs_diff(cred.timestamp) > WINDOW_SECS {
        return Err(AuthError::TimestampOutOfWindow);
    }
    // The standard engine rejects non-canonical encodings, so comparing the decoded tag is the
    // same as comparing the base64 strings, which is what Actrix does (non-constant-time).
    let mut tag = [0u8; 32];
    match base64::engine::general_purpose::STANDARD
        .decode_slice(cred.signature.as_bytes(), &mut tag)
    {
        Ok(32) => {}
        _ => return Err(AuthError::InvalidSignature),
    }
    mac(secret, cred.timestamp, &cred.nonce, payload)
        .verify_slice(&tag)
        .map_err(|_| AuthError::InvalidSignature)
}

struct NonceInner {
    conn: Connection,
    count: usize,
    inserts_since_purge: usize,
}

/// Where a committed decision goes.
enum Reply {
    Sync(std::sync::mpsc::SyncSender<Result<(), AuthError>>),
    Async(tokio::sync::oneshot::Sender<Result<(), AuthError>>),
}

/// One request waiting for its nonce to be committed.
struct Pending {
    /// When the request was checked (Unix seconds).
    now_unix: u64,
    context: String,
    nonce: String,
    timestamp: u64,
    reply: Reply,
}

/// Group commit: requests queue here; one writer at a time takes everything queued and commits
/// it in one transaction, so concurrent signed requests share one fsync instead of paying one
/// each, and async callers never hold a thread while they wait.
#[derive(Default)]
struct Group {
    queue: Vec<Pending>,
    writing: bool,
}

/// Persistent, bounded table of seen nonces.
pub struct NonceStore {
    inner: Mutex<NonceInner>,
    group: Mutex<Group>,
    capacity: usize,
    ttl: u64,
    path: PathBuf,
}

impl std::fmt::Debug for NonceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceStore")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl NonceStore {
    /// Open (or create) the nonce table in the database at `path`.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, ControlError> {
        let conn = crate::db::open(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS nonces (
                 context TEXT NOT NULL,
                 nonce   TEXT NOT NULL,
                 ts      INTEGER NOT NULL,
                 seen_at INTEGER NOT NULL,
                 UNIQUE (context, nonce)
             );
             CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts);
             CREATE INDEX IF NOT EXISTS nonces_seen_at ON nonces (seen_at);",
        )
        .map_err(|e| ControlError::db(path, e))?;
        let count: i64 = conn
            .query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get(0))
            .map_err(|e| ControlError::db(path, e))?;
        crate::db::restrict_permissions(path);
        Ok(NonceStore {
            inner: Mutex::new(NonceInner {
                conn,
                count: count.max(0) as usize,
                inserts_since_purge: 0,
            }),
            group: Mutex::new(Group::default()),
            capacity: capacity.max(1),
            ttl: NONCE_TTL_SECS,
            path: path.to_owned(),
        })
    }

    /// Queue a request; true when the caller must become the writer.
    fn enqueue(&self, p: Pending) -> bool {
        let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        g.queue.push(p);
        !std::mem::replace(&mut g.writing, true)
    }

    /// Commit batches until the queue is empty. `handoff`: after the first batch, pass the
    /// remaining work to the blocking pool when there is a runtime (a synchronous caller
    /// answers its own request first instead of draining other people's work).
    fn drain(self: &Arc<Self>, handoff: bool) {
        let mut first = true;
        loop {
            let batch = {
                let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
                if g.queue.is_empty() {
                    g.writing = false;
                    return;
                }
                if !first && handoff {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let me = self.clone();
                        rt.spawn_blocking(move || me.drain(false));
                        return;
                    }
                }
                std::mem::take(&mut g.queue)
            };
            first = false;
            let results = self.commit_batch(&batch);
            for (p, r) in batch.into_iter().zip(results) {
                match p.reply {
                    Reply::Sync(tx) => {
                        let _ = tx.send(r);
                    }
                    Reply::Async(tx) => {
                        let _ = tx.send(r);
                    }
                }
            }
        }
    }

    fn pending(now_unix: u64, context: &str, nonce: &str, timestamp: u64, reply: Reply) -> Pending {
        Pending {
            now_unix,
            context: context.to_owned(),
            nonce: nonce.to_owned(),
            timestamp,
            reply,
        }
    }

    /// Step 3 at `now_unix`: refuse a nonce seen within the TTL, otherwise remember it.
    /// Returns once the decision is committed (`synchronous=FULL`); concurrent callers share
    /// one commit.
    pub fn check_and_store(
        self: &Arc<Self>,
        now_unix: u64,
        context: &str,
        nonce: &str,
        timestamp: u64,
    ) -> Result<(), AuthError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let p = Self::pending(now_unix, context, nonce, timestamp, Reply::Sync(tx));
        if self.enqueue(p) {
            self.drain(true);
        }
        rx.recv()
            .unwrap_or_else(|_| Err(AuthError::Storage("nonce writer stopped".into())))
    }

    /// [`Self::check_and_store`] for async callers: waits without holding a thread. The commit
    /// itself runs on the runtime's blocking pool, one task per batch.
    pub async fn check_and_store_async(
        self: &Arc<Self>,
        now_unix: u64,
        context: &str,
        nonce: &str,
        timestamp: u64,
    ) -> Result<(), AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let p = Self::pending(now_unix, context, nonce, timestamp, Reply::Async(tx));
        if self.enqueue(p) {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.drain(false));
        }
        rx.await
            .unwrap_or_else(|_| Err(AuthError::Storage("nonce writer stopped".into())))
    }

    /// Decide and record every pending nonce in one transaction, in order (a nonce twice in
    /// one batch: the second is a duplicate). On a failed commit every request of the batch
    /// gets a storage error (none was acknowledged).
    fn commit_batch(&self, batch: &[Pending]) -> Vec<Result<(), AuthError>> {
        let storage = |e: rusqlite::Error| AuthError::Storage(e.to_string());
        let fail_all = |e: AuthError| batch.iter().map(|_| Err(e.clone())).collect();
        let Ok(mut inner) = self.inner.lock() else {
            return fail_all(AuthError::Storage("nonce store lock poisoned".into()));
        };
        if let Err(e) = inner.conn.execute_batch("BEGIN IMMEDIATE") {
            return fail_all(storage(e));
        }
        let (count0, since0) = (inner.count, inner.inserts_since_purge);
        let results: Vec<_> = batch
            .iter()
            .map(|p| self.check_one(&mut inner, p))
            .collect();
        let now_unix = batch.iter().map(|p| p.now_unix).max().unwrap_or(0);
        let mut res = Ok(());
        if inner.inserts_since_purge >= 1000 || inner.count > self.capacity {
            res = self.purge_locked(now_unix, &mut inner);
        }
        if let Err(e) = res.and_then(|()| inner.conn.execute_batch("COMMIT")) {
            let _ = inner.conn.execute_batch("ROLLBACK");
            inner.count = count0;
            inner.inserts_since_purge = since0;
            return fail_all(storage(e));
        }
        results
    }

    fn check_one(&self, inner: &mut NonceInner, p: &Pending) -> Result<(), AuthError> {
        let storage = |e: rusqlite::Error| AuthError::Storage(e.to_string());
        let now_i = to_i64(p.now_unix);
        let seen: Option<i64> = inner
            .conn
            .prepare_cached("SELECT seen_at FROM nonces WHERE context = ?1 AND nonce = ?2")
            .and_then(|mut s| {
                s.query_row(params![p.context, p.nonce], |r| r.get(0))
                    .optional()
            })
            .map_err(storage)?;
        match seen {
            // Also a duplicate when the clock went backwards (seen_at > now).
            Some(seen_at) if seen_at.saturating_add(to_i64(self.ttl)) >= now_i => {
                Err(AuthError::DuplicateNonce)
            }
            Some(_) => inner
                .conn
                .prepare_cached(
                    "UPDATE nonces SET ts = ?3, seen_at = ?4 WHERE context = ?1 AND nonce = ?2",
                )
                .and_then(|mut s| {
                    s.execute(params![p.context, p.nonce, to_i64(p.timestamp), now_i])
                })
                .map(|_| ())
                .map_err(storage),
            None => {
                inner
                    .conn
                    .prepare_cached(
                        "INSERT INTO nonces (context, nonce, ts, seen_at) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![p.context, p.nonce, to_i64(p.timestamp), now_i])
                    })
                    .map_err(storage)?;
                inner.count += 1;
                inner.inserts_since_purge += 1;
                Ok(())
            }
        }
    }

    fn purge_locked(&self, now_unix: u64, inner: &mut NonceInner) -> Result<(), rusqlite::Error> {
        inner.inserts_since_purge = 0;
        let cutoff = to_i64(now_unix).saturating_sub(to_i64(self.ttl));
        let removed = inner
            .conn
            .execute("DELETE FROM nonces WHERE seen_at < ?1", params![cutoff])?;
        inner.count = inner.count.saturating_sub(removed);
        if inner.count > self.capacity {
            // Evict a little more than needed so a sustained flood does not pay for a delete on
            // every insert.
            let excess = inner.count - self.capacity + self.capacity / 100;
            let removed = inner.conn.execute(
                "DELETE FROM nonces WHERE rowid IN
                     (SELECT rowid FROM nonces ORDER BY ts ASC, rowid ASC LIMIT ?1)",
                params![to_i64(excess as u64)],
            )?;
            inner.count = inner.count.saturating_sub(removed);
            tracing::warn!(
                evicted = removed,
                capacity = self.capacity,
                "nonce table over capacity; evicted the oldest nonces"
            );
        }
        Ok(())
    }

    /// Number of remembered nonces.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.count).unwrap_or(0)
    }

    /// True when no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows actually in the table (for tests and health checks).
    pub fn count_rows(&self) -> Result<usize, ControlError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| ControlError::db(&self.path, "lock poisoned"))?;
        let n: i64 = inner
            .conn
            .query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get(0))
            .map_err(|e| ControlError::db(&self.path, e))?;
        Ok(n.max(0) as usize)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Full verifier: shared key, nonce table, clock.
#[derive(Clone)]
pub struct NonceAuthenticator {
    secret: Arc<Zeroizing<Vec<u8>>>,
    store: Arc<NonceStore>,
    clock: SharedClock,
}

impl std::fmt::Debug for NonceAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceAuthenticator")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl NonceAuthenticator {
    /// A verifier using `secret` (the UTF-8 bytes of the shared key).
    pub fn new(secret: &[u8], store: Arc<NonceStore>, clock: SharedClock) -> Self {
        NonceAuthenticator {
            secret: Arc::new(Zeroizing::new(secret.to_vec())),
            store,
            clock,
        }
    }

    /// Verify `cred` for `payload` in `context` (empty for KS, as Actrix), in the fixed order.
    pub fn verify(
        &self,
        context: &str,
        cred: &NonceCredential,
        payload: &str,
    ) -> Result<(), AuthError> {
        let now_unix = self.clock.now_unix();
        check_signature(now_unix, &self.secret, cred, payload)?;
        self.store
            .check_and_store(now_unix, context, &cred.nonce, cred.timestamp)
    }

    /// [`Self::verify`] for the HTTP event loop: the window and MAC are checked inline (a few
    /// microseconds), the nonce commit is awaited without holding a thread.
    pub async fn verify_async(
        &self,
        context: &str,
        cred: &NonceCredential,
        payload: &str,
    ) -> Result<(), AuthError> {
        let now_unix = self.clock.now_unix();
        check_signature(now_unix, &self.secret, cred, payload)?;
        self.store
            .check_and_store_async(now_unix, context, &cred.nonce, cred.timestamp)
            .await
    }

    /// The clock this verifier uses.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The nonce table.
    pub fn store(&self) -> &Arc<NonceStore> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"unit-test-shared-key-0123456789";
    const NONCE: &str = "123e4567-e89b-42d3-a456-426614174000";

    #[test]
    fn vectors_a1() {
        assert_eq!(
            sign(SECRET, 1767225600, NONCE, "generate_key"),
            "9JXTBRBs5Sbezgbtv4Kox1hjjtV/Z8nGEGUDhY5+WQg="
        );
        assert_eq!(
            sign(SECRET, 1767225600, NONCE, "get_secret_key:7"),
            "WyHvqeX4G7sgbSaGpL7TmnLzF634B4oWHDq6doMBHTs="
        );
    }

    #[test]
    fn window_is_inclusive_and_mac_checked_after_window() {
        let ts = 1767225600;
        let cred = NonceCredential {
            timestamp: ts,
            nonce: NONCE.into(),
            signature: sign(SECRET, ts, NONCE, "generate_key"),
        };
        for now in [ts - 60, ts, ts + 60] {
            assert_eq!(check_signature(now, SECRET, &cred, "generate_key"), Ok(()));
        }
        for now in [ts - 61, ts + 61] {
            assert_eq!(
                check_signature(now, SECRET, &cred, "generate_key"),
                Err(AuthError::TimestampOutOfWindow)
            );
        }
        assert_eq!(
            check_signature(ts, SECRET, &cred, "get_secret_key:7"),
            Err(AuthError::InvalidSignature)
        );
        let mut bad = cred.clone();
        bad.signature = "not base64!".into();
        assert_eq!(
            check_signature(ts, SECRET, &bad, "generate_key"),
            Err(AuthError::InvalidSignature)
        );
        bad.signature = base64::engine::general_purpose::STANDARD.encode([0u8; 31]);
        assert_eq!(
            check_signature(ts, SECRET, &bad, "generate_key"),
            Err(AuthError::InvalidSignature)
        );
    }

    #[test]
    fn uuid_shape() {
        let n = new_nonce();
        assert_eq!(n.len(), 36);
        assert_eq!(&n[14..15], "4");
    }
}
