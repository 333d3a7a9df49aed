//! TURN identity verification (wire reference section 6.3), owned by the control thread.
//!
//! The data plane never calls this directly: a shard sends an
//! [`actrix_proto::auth::IdentityRequest`] over a bounded channel and finds the
//! [`actrix_proto::auth::IdentityAnswer`] in its own channel when the client retransmits. The verifier
//! keeps the KS secret keys it fetched, per key id, until the key's `expires_at` (then it asks
//! the KS again, which serves keys until `expires_at + tolerance`), and it remembers unknown key
//! ids for a short time so a flood of forged usernames does not become a flood of KS requests.

use std::collections::HashMap;

use actrix_proto::auth::{IdentityAnswer, IdentityKey, IdentityRefusal};

use zeroize::Zeroizing;

use crate::ais::IdentityClaims;
use crate::crypto::{self, SECRET_KEY_LEN};
use crate::ks::store::{KeyId, SecretRecord};
use crate::ks::{KeySource, KeySourceError};
use crate::realms::{RealmError, RealmStore};

/// Most secret keys kept in memory.
const MAX_CACHED_KEYS: usize = 1024;
/// Most unknown key ids remembered.
const MAX_NEGATIVE: usize = 4096;
/// How long an unknown key id is remembered.
const NEGATIVE_TTL_SECS: u64 = 10;
/// Longest accepted PSK in the claims (Actrix issues 32 bytes).
const MAX_PSK_LEN: usize = 64;

/// A verified TURN identity: the long-term key and when the credential stops being valid.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TurnIdentity {
    /// MD5(username ":" realm ":" hex(psk)).
    pub key: [u8; 16],
    /// SHA-256(username ":" realm ":" hex(psk)), for PASSWORD-ALGORITHM SHA-256.
    pub key_sha256: [u8; 32],
    /// Who the credential belongs to: a digest of the claims' realm and actor id, the same
    /// for every credential issued to that actor (allocation quotas count by it).
    pub actor: [u8; 16],
    /// The claims' `expr_time` (Unix seconds). Recheck it on auth-cache hits (wire section 9.4).
    pub expires_at: u64,
    /// The actor's realm.
    pub realm_id: u32,
}

impl std::fmt::Debug for TurnIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnIdentity")
            .field("expires_at", &self.expires_at)
            .field("realm_id", &self.realm_id)
            .finish_non_exhaustive()
    }
}

/// Why a TURN username was refused. `Copy`, so the data plane can count it without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not base122, or shorter than realm id + key id.
    #[error("malformed username")]
    MalformedUsername,
    /// The KS does not know the key id (or it expired beyond tolerance).
    #[error("unknown key")]
    UnknownKey,
    /// The KS could not be reached; retryable.
    #[error("key server unavailable")]
    KeyUnavailable,
    /// The token does not decrypt or its claims do not parse.
    #[error("invalid token")]
    InvalidToken,
    /// `now > expr_time`.
    #[error("credential expired")]
    Expired,
    /// The claims' realm differs from the username's realm.
    #[error("realm mismatch")]
    RealmMismatch,
    #[error("realm not found")]
    RealmNotFound,
    #[error("realm suspended")]
    RealmSuspended,
    #[error("realm terminated")]
    RealmTerminated,
    #[error("realm expired")]
    RealmExpired,
    /// Too many queries waiting for the KS.
    #[error("overloaded")]
    Overloaded,
    /// Local failure (storage).
    #[error("internal error")]
    Internal,
}

impl IdentityError {
    /// Whether asking again later may succeed (the client may retransmit).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            IdentityError::KeyUnavailable | IdentityError::Overloaded | IdentityError::Internal
        )
    }
}

impl From<RealmError> for IdentityError {
    fn from(e: RealmError) -> Self {
        match e {
            RealmError::NotFound => IdentityError::RealmNotFound,
            RealmError::Suspended => IdentityError::RealmSuspended,
            RealmError::Terminated => IdentityError::RealmTerminated,
            RealmError::Expired => IdentityError::RealmExpired,
            RealmError::Storage(_) => IdentityError::Internal,
        }
    }
}

impl IdentityError {
    /// The refusal as the data plane sees it (retry or not, and why).
    pub fn refusal(self) -> IdentityRefusal {
        IdentityRefusal {
            reason: match self {
                IdentityError::MalformedUsername => "malformed username",
                IdentityError::UnknownKey => "unknown key",
                IdentityError::KeyUnavailable => "key server unavailable",
                IdentityError::InvalidToken => "invalid token",
                IdentityError::Expired => "credential expired",
                IdentityError::RealmMismatch => "realm mismatch",
                IdentityError::RealmNotFound => "realm not found",
                IdentityError::RealmSuspended => "realm suspended",
                IdentityError::RealmTerminated => "realm terminated",
                IdentityError::RealmExpired => "realm expired",
                IdentityError::Overloaded => "overloaded",
                IdentityError::Internal => "internal error",
            },
            retryable: self.is_retryable(),
        }
    }
}

/// The actor behind an identity credential, for the data plane's quota accounting: the first
/// 16 bytes of SHA-256("actrix-quota" ‖ realm id ‖ actor id). Re-issued credentials of one actor
/// give the same digest; the data plane never sees the actor id itself.
pub fn actor_digest(realm_id: u32, actor_id: &str) -> [u8; 16] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"actrix-quota");
    h.update(realm_id.to_be_bytes());
    h.update(actor_id.as_bytes());
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// The answer to send back to the shard that asked about `username`.
pub fn answer(username: Box<[u8]>, r: Result<TurnIdentity, IdentityError>) -> IdentityAnswer {
    IdentityAnswer {
        username,
        outcome: r
            .map(|id| IdentityKey {
                key_md5: id.key,
                key_sha256: id.key_sha256,
                expires_at: id.expires_at,
                quota_key: id.actor,
            })
            .map_err(IdentityError::refusal),
    }
}

struct CachedSecret {
    secret: Zeroizing<[u8; SECRET_KEY_LEN]>,
    expires_at: u64,
}

impl CachedSecret {
    /// Wire section 5.4 step 1: use the cache while `now_unix < expires_at` (or it never
    /// expires).
    fn fresh(&self, now_unix: u64) -> bool {
        self.expires_at == 0 || now_unix < self.expires_at
    }
}

/// A parsed TURN username: realm id, key id, token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUsername {
    pub realm_id: u32,
    pub key_id: KeyId,
    pub token: Vec<u8>,
}

/// Step 1: base122-decode and split.
pub fn parse_username(username: &[u8]) -> Result<ParsedUsername, IdentityError> {
    let raw = crypto::base122_decode(username).map_err(|_| IdentityError::MalformedUsername)?;
    if raw.len() < 8 {
        return Err(IdentityError::MalformedUsername);
    }
    Ok(ParsedUsername {
        realm_id: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
        key_id: u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]),
        token: raw[8..].to_vec(),
    })
}

/// What the verifier needs before it can answer without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `verify` will not touch the network.
    Ready,
    /// `verify` would fetch this key from a remote KS.
    NeedsKey(KeyId),
}

/// What the verifier did (for `/metrics`): every resolution, every ECIES decryption and every
/// KS secret-key fetch. The data plane caches the answers, so under a flood of Allocates with
/// one credential these stay at one each.
#[derive(Debug, Default)]
pub struct IdentityStats {
    /// Usernames verified (success or refusal).
    pub resolutions: std::sync::atomic::AtomicU64,
    /// Tokens decrypted (ECIES).
    pub decryptions: std::sync::atomic::AtomicU64,
    /// KS secret keys fetched (local store or remote KS).
    pub key_fetches: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The TURN identity verifier.
pub struct IdentityVerifier {
    keys: KeySource,
    realms: RealmStore,
    turn_realm: String,
    cache: HashMap<KeyId, CachedSecret>,
    negative: HashMap<KeyId, u64>,
    stats: std::sync::Arc<IdentityStats>,
}

impl std::fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityVerifier")
            .field("turn_realm", &self.turn_realm)
            .field("cached_keys", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl IdentityVerifier {
    /// A verifier fetching keys from `keys`, checking realms in `realms`, deriving keys for the
    /// TURN realm `turn_realm`.
    pub fn new(keys: KeySource, realms: RealmStore, turn_realm: impl Into<String>) -> Self {
        IdentityVerifier {
            keys,
            realms,
            turn_realm: turn_realm.into(),
            cache: HashMap::new(),
            negative: HashMap::new(),
            stats: Default::default(),
        }
    }

    /// Count into `stats` (shared with `/metrics`).
    pub fn with_stats(mut self, stats: std::sync::Arc<IdentityStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Whether [`IdentityVerifier::verify`] can run without a network round trip at
    /// `now_unix`.
    #[must_use]
    pub fn readiness(&self, now_unix: u64, username: &[u8]) -> Readiness {
        if !self.keys.is_remote() {
            return Readiness::Ready;
        }
        let Ok(p) = parse_username(username) else {
            return Readiness::Ready;
        };
        if self.cache.get(&p.key_id).is_some_and(|c| c.fresh(now_unix))
            || self
                .negative
                .get(&p.key_id)
                .is_some_and(|&until| now_unix < until)
        {
            Readiness::Ready
        } else {
            Readiness::NeedsKey(p.key_id)
        }
    }

    /// Store the outcome of a key fetch done elsewhere (the control thread fetches remote keys
    /// on the blocking pool so its event loop never waits for the network).
    pub fn insert_fetched(
        &mut self,
        now_unix: u64,
        key_id: KeyId,
        result: &Result<SecretRecord, KeySourceError>,
    ) {
        bump(&self.stats.key_fetches);
        match result {
            Ok(rec) => self.insert_secret(rec),
            Err(KeySourceError::NotFound) => self.remember_unknown(now_unix, key_id),
            Err(_) => {}
        }
    }

    fn insert_secret(&mut self, rec: &SecretRecord) {
        if self.cache.len() >= MAX_CACHED_KEYS && !self.cache.contains_key(&rec.key_id) {
            // Drop the key expiring first: it is the least useful. Keys are few in practice
            // (one per KS TTL), so this is rare and the scan is short.
            if let Some(oldest) = self
                .cache
                .iter()
                .min_by_key(|(_, c)| {
                    if c.expires_at == 0 {
                        u64::MAX
                    } else {
                        c.expires_at
                    }
                })
                .map(|(k, _)| *k)
            {
                self.cache.remove(&oldest);
            }
        }
        self.negative.remove(&rec.key_id);
        self.cache.insert(
            rec.key_id,
            CachedSecret {
                secret: rec.secret_key.clone(),
                expires_at: rec.expires_at,
            },
        );
    }

    fn remember_unknown(&mut self, now_unix: u64, key_id: KeyId) {
        if self.negative.len() >= MAX_NEGATIVE {
            self.negative.retain(|_, until| now_unix < *until);
            if self.negative.len() >= MAX_NEGATIVE {
                self.negative.clear();
            }
        }
        self.negative
            .insert(key_id, now_unix.saturating_add(NEGATIVE_TTL_SECS));
    }

    fn secret_for(
        &mut self,
        now_unix: u64,
        key_id: KeyId,
    ) -> Result<Zeroizing<[u8; SECRET_KEY_LEN]>, IdentityError> {
        if let Some(c) = self.cache.get(&key_id) {
            if c.fresh(now_unix) {
                return Ok(c.secret.clone());
            }
        }
        if self
            .negative
            .get(&key_id)
            .is_some_and(|&until| now_unix < until)
        {
            return Err(IdentityError::UnknownKey);
        }
        bump(&self.stats.key_fetches);
        match self.keys.secret(key_id) {
            Ok(rec) => {
                self.insert_secret(&rec);
                Ok(rec.secret_key)
            }
            Err(KeySourceError::NotFound) => {
                self.cache.remove(&key_id);
                self.remember_unknown(now_unix, key_id);
                Err(IdentityError::UnknownKey)
            }
            Err(KeySourceError::Unavailable(_)) => Err(IdentityError::KeyUnavailable),
            Err(KeySourceError::Internal(e)) => {
                tracing::error!(key_id, error = %e, "identity: key lookup failed");
                Err(IdentityError::Internal)
            }
        }
    }

    /// Wire section 6.3 steps 1-4 at `now_unix`. May block on a remote KS when the key is not
    /// cached; see [`IdentityVerifier::readiness`].
    pub fn verify(
        &mut self,
        now_unix: u64,
        username: &[u8],
    ) -> Result<TurnIdentity, IdentityError> {
        bump(&self.stats.resolutions);
        // 1. base122, split.
        let parsed = parse_username(username)?;
        // 2. token against the realm (wire section 5.4).
        let secret = self.secret_for(now_unix, parsed.key_id)?;
        bump(&self.stats.decryptions);

        let plain = crypto::ecies_decrypt(&secret[..], &parsed.token)
            .map_err(|_| IdentityError::InvalidToken)?;
        let claims: IdentityClaims =
            serde_json::from_slice(&plain).map_err(|_| IdentityError::InvalidToken)?;
        let psk = Zeroizing::new(claims.psk.clone());
        if psk.is_empty() || psk.len() > MAX_PSK_LEN {
            return Err(IdentityError::InvalidToken);
        }
        if now_unix > claims.expr_time {
            return Err(IdentityError::Expired);
        }
        if claims.realm_id != parsed.realm_id {
            return Err(IdentityError::RealmMismatch);
        }
        // 3. the realm must exist, be Normal and not expired.
        self.realms.check(now_unix, parsed.realm_id)?;
        // 4. long-term key.
        Ok(TurnIdentity {
            key: crypto::turn_key(username, &self.turn_realm, &psk),
            key_sha256: crypto::turn_key_sha256(username, &self.turn_realm, &psk),
            actor: actor_digest(claims.realm_id, &claims.actor_id),
            expires_at: claims.expr_time,
            realm_id: parsed.realm_id,
        })
    }

    /// The key source (for the control thread's asynchronous fetches).
    pub fn key_source(&self) -> &KeySource {
        &self.keys
    }
}
