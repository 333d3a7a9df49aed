//! Actor Identity Service (AIS): wire reference section 5.
//!
//! `POST /ais/register` takes an `actr.RegisterRequest` and returns an `actr.RegisterResponse`
//! carrying a fresh Snowflake serial, an ECIES-encrypted IdentityClaims token under the current
//! KS public key, and a 32-byte random PSK.
//!
//! Authentication (wire reference section 9.6 requires it): every `/ais/*` route except
//! `/ais/health` accepts a nonce-auth signature over the shared key in three request headers,
//! `X-Actrix-Timestamp` (Unix seconds), `X-Actrix-Nonce` and `X-Actrix-Signature`, with the
//! context `ais` and these payloads:
//!
//! | route | payload |
//! |---|---|
//! | `POST /ais/register` | `ais_register:<lowercase hex SHA-256 of the body>` |
//! | `POST /ais/rotate-key` | `ais_rotate_key` |
//! | `GET /ais/current-key` | `ais_current_key` |
//! | `PUT /ais/realms/{id}` | `ais_put_realm:<id>:<lowercase hex SHA-256 of the body>` |
//! | `GET /ais/realms/{id}` | `ais_get_realm:<id>` |
//!
//! `POST /ais/register` is also accepted unsigned from a loopback peer (the signaling hub in the
//! same process or host calls it that way, like Actrix), unless
//! `ais.allow_unsigned_loopback_register = false`. The peer address is the TCP peer, never a
//! forwarded-for header. Admin routes always need the signature.
//!
//! The current KS key is kept in memory and in the `ais_current_key` table of `control.db`, and
//! refreshed `key_refresh_ahead_secs` before it expires (background task plus on demand).
//!
//! actr 0.4 clients (`control/WIRE-0.4.md`, module [`v4`]) use the same `POST /ais/register`
//! and `POST /ais/renew`, unsigned (they are public client endpoints, behind the same per-IP
//! rate limit). Which protocol a register request speaks is decided before anything else, by
//! [`is_v4_register`]: `Content-Type: application/x-protobuf` (what actr 0.4's `AisClient`
//! sends; Actrix's own 0.1 components send `application/octet-stream`) or a field number only
//! the 0.4 `RegisterRequest` defines (10-17) makes it 0.4; anything else is the 0.1.7 API
//! above, with its authentication rules. The 0.4 signing keys are rotated by the same background
//! task (`POST /ais/rotate-signing-key`, signed with payload `ais_rotate_signing_key`, forces a
//! rotation).

pub mod proto;
pub mod signing;
pub mod snowflake;
pub mod v4;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use prost::Message as _;
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::config::AisConfig;
use crate::crypto::{self, PUBLIC_KEY_LEN};
use crate::error::ControlError;
use crate::ks::{KeySource, KeySourceError};
use crate::nonce_auth::{AuthError, NonceAuthenticator, NonceCredential};
use crate::ratelimit::RateLimiter;
use crate::realms::{Realm, RealmStore};
use proto::{
    register_response, AIdCredential, ActrId, RegisterRequest, RegisterResponse, Timestamp,
};
use snowflake::Snowflake;

/// nonce-auth context of AIS requests.
pub const AIS_CONTEXT: &str = "ais";
/// Header carrying the signed timestamp.
pub const HEADER_TIMESTAMP: &str = "x-actrix-timestamp";
/// Header carrying the nonce.
pub const HEADER_NONCE: &str = "x-actrix-nonce";
/// Header carrying the signature.
pub const HEADER_SIGNATURE: &str = "x-actrix-signature";
/// Largest accepted `/ais` request body.
const MAX_BODY: usize = 64 * 1024;
/// A key must stay fetchable by verifiers for at least this long to be used for new tokens.
const MIN_KEY_REMAINING_SECS: u64 = 60;

/// The signed payload of `POST /ais/register` for `body`.
pub fn register_payload(body: &[u8]) -> String {
    format!("ais_register:{}", hex::encode(Sha256::digest(body)))
}

/// The signed payload of `PUT /ais/realms/{id}` for `body`.
pub fn put_realm_payload(realm_id: u32, body: &[u8]) -> String {
    format!(
        "ais_put_realm:{realm_id}:{}",
        hex::encode(Sha256::digest(body))
    )
}

/// The claims inside a token, serialized in exactly this field order (wire section 5.4).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaims {
    pub realm_id: u32,
    pub actor_id: String,
    pub expr_time: u64,
    /// 32 bytes, serialized as an array of numbers.
    pub psk: Vec<u8>,
}

impl std::fmt::Debug for IdentityClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityClaims")
            .field("realm_id", &self.realm_id)
            .field("actor_id", &self.actor_id)
            .field("expr_time", &self.expr_time)
            .finish_non_exhaustive()
    }
}

/// The KS key the AIS encrypts tokens with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrentKey {
    pub key_id: u32,
    pub public_key: [u8; PUBLIC_KEY_LEN],
    pub expires_at: u64,
    pub tolerance_seconds: u64,
}

impl CurrentKey {
    fn needs_refresh(&self, now_unix: u64, ahead: u64) -> bool {
        self.expires_at != 0 && now_unix.saturating_add(ahead) >= self.expires_at
    }

    /// Verifiers can fetch the secret until `expires_at + tolerance`.
    fn fetchable_until(&self) -> u64 {
        if self.expires_at == 0 {
            u64::MAX
        } else {
            self.expires_at.saturating_add(self.tolerance_seconds)
        }
    }

    fn usable(&self, now_unix: u64) -> bool {
        self.fetchable_until() > now_unix.saturating_add(MIN_KEY_REMAINING_SECS)
    }
}

/// Persistent single-row cache of the current key.
struct KeyCache {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl KeyCache {
    fn open(path: &Path) -> Result<Self, ControlError> {
        let conn = crate::db::open(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS ais_current_key (
                 id                INTEGER PRIMARY KEY CHECK (id = 1),
                 key_id            INTEGER NOT NULL,
                 public_key        BLOB NOT NULL,
                 expires_at        INTEGER NOT NULL,
                 tolerance_seconds INTEGER NOT NULL
             );",
        )
        .map_err(|e| ControlError::db(path, e))?;
        Ok(KeyCache {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn load(&self) -> Result<Option<CurrentKey>, String> {
        let conn = self.conn.lock().map_err(|_| "lock poisoned".to_owned())?;
        let row: Option<(i64, Vec<u8>, i64, i64)> = conn
            .query_row(
                "SELECT key_id, public_key, expires_at, tolerance_seconds FROM ais_current_key WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| e.to_string())?;
        Ok(row.and_then(|(id, pk, exp, tol)| {
            Some(CurrentKey {
                key_id: u32::try_from(id).ok()?,
                public_key: pk.try_into().ok()?,
                expires_at: u64::try_from(exp).ok()?,
                tolerance_seconds: u64::try_from(tol).ok()?,
            })
        }))
    }

    fn save(&self, k: &CurrentKey) -> Result<(), String> {
        let conn = self.conn.lock().map_err(|_| "lock poisoned".to_owned())?;
        conn.execute(
            "INSERT INTO ais_current_key (id, key_id, public_key, expires_at, tolerance_seconds)
             VALUES (1, ?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET key_id = excluded.key_id,
                 public_key = excluded.public_key, expires_at = excluded.expires_at,
                 tolerance_seconds = excluded.tolerance_seconds",
            params![
                i64::from(k.key_id),
                &k.public_key[..],
                i64::try_from(k.expires_at).unwrap_or(i64::MAX),
                i64::try_from(k.tolerance_seconds).unwrap_or(i64::MAX)
            ],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn ping(&self) -> bool {
        self.conn
            .lock()
            .ok()
            .and_then(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).ok())
            .is_some()
    }
}

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AisError {
    /// The KS cannot be reached and no usable key is cached (503).
    #[error("key server unavailable: {0}")]
    KsUnavailable(String),
    /// Anything else (500).
    #[error("{0}")]
    Internal(String),
}

/// The Actor Identity Service.
pub struct AisService {
    cfg: AisConfig,
    keys: KeySource,
    cache: KeyCache,
    current: Mutex<Option<CurrentKey>>,
    refresh_lock: Mutex<()>,
    snowflake: Snowflake,
    clock: SharedClock,
    auth: NonceAuthenticator,
    limiter: RateLimiter,
    realms: RealmStore,
    v4: Option<v4::V4Issuer>,
}

impl std::fmt::Debug for AisService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AisService")
            .field("cache", &self.cache.path)
            .finish_non_exhaustive()
    }
}

impl AisService {
    /// Build the AIS. `cache_path` is the database holding the current-key cache.
    pub fn new(
        cfg: AisConfig,
        keys: KeySource,
        cache_path: &Path,
        worker_id: u8,
        auth: NonceAuthenticator,
        realms: RealmStore,
    ) -> Result<Self, ControlError> {
        let cache = KeyCache::open(cache_path)?;
        let current = cache.load().map_err(|e| ControlError::db(cache_path, e))?;
        let limiter = RateLimiter::new(cfg.rate_limit_burst, cfg.rate_limit_refill_secs, 65_536);
        Ok(AisService {
            clock: auth.clock().clone(),
            cfg,
            keys,
            cache,
            current: Mutex::new(current),
            refresh_lock: Mutex::new(()),
            snowflake: Snowflake::new(worker_id),
            auth,
            limiter,
            realms,
            v4: None,
        })
    }

    /// Serve actr 0.4 clients too: credentials signed with `keys`, TURN credentials under
    /// `turn_secret` (the TURN server's first REST secret).
    #[must_use]
    pub fn with_v4(mut self, keys: Arc<signing::SigningKeys>, turn_secret: &[u8]) -> Self {
        self.v4 = Some(v4::V4Issuer::new(
            keys,
            turn_secret,
            v4::V4Settings {
                token_ttl_secs: self.cfg.token_ttl_secs,
                renewal_ttl_secs: self.cfg.renewal_ttl_secs,
                heartbeat_interval_secs: self.cfg.heartbeat_interval_secs,
            },
        ));
        self
    }

    /// Whether actr 0.4 clients are served.
    pub fn v4_enabled(&self) -> bool {
        self.v4.is_some()
    }

    /// The 0.4 signing keys, when 0.4 is served.
    pub fn signing_keys(&self) -> Option<&Arc<signing::SigningKeys>> {
        self.v4.as_ref().map(|v| &v.keys)
    }

    /// `POST /ais/register` for an actr 0.4 client (encoded `RegisterRequest` of 0.4). Blocking.
    #[must_use = "the reply to send"]
    pub fn register_v4(&self, body: &[u8]) -> actrix_wire::v4::actr::RegisterResponse {
        use actrix_wire::v4::actr as p4;
        match &self.v4 {
            Some(v) => v.register(
                self.clock.now_unix(),
                self.clock.now_unix_ms(),
                &self.snowflake,
                &self.realms,
                body,
            ),
            None => p4::RegisterResponse {
                result: Some(p4::register_response::Result::Error(p4::ErrorResponse {
                    code: 503,
                    message: "actr 0.4 registration is not configured on this node".into(),
                })),
            },
        }
    }

    /// `POST /ais/renew` (actr 0.4). Blocking.
    #[must_use = "the reply to send"]
    pub fn renew_v4(&self, body: &[u8]) -> actrix_wire::v4::actr::RenewCredentialResponse {
        use actrix_wire::v4::actr as p4;
        match &self.v4 {
            Some(v) => v.renew(self.clock.now_unix(), &self.realms, body),
            None => p4::RenewCredentialResponse {
                result: Some(p4::renew_credential_response::Result::Error(
                    p4::ErrorResponse {
                        code: 503,
                        message: "actr 0.4 renewal is not configured on this node".into(),
                    },
                )),
            },
        }
    }

    /// Verify an actr 0.4 credential's signature at `now_unix` and decode its claims (expiry,
    /// realm and identity are the caller's to check). Never blocks.
    pub fn verify_v4(
        &self,
        now_unix: u64,
        cred: &actrix_wire::v4::actr::AIdCredential,
    ) -> Result<v4::VerifiedClaims, v4::CredentialError> {
        match &self.v4 {
            Some(v) => v.verify(now_unix, cred),
            None => Err(v4::CredentialError::Disabled),
        }
    }

    /// What a 0.4 actor registered with (ACL, spec, direct address), taken once by signaling
    /// when the actor connects.
    pub fn take_pending_v4(
        &self,
        realm_id: u32,
        serial: u64,
    ) -> Option<actrix_wire::v4::actr::RegisterRequest> {
        self.v4.as_ref()?.take_pending(realm_id, serial)
    }

    fn current(&self) -> Option<CurrentKey> {
        self.current.lock().ok().and_then(|g| *g)
    }

    /// Fetch a new key from the KS and make it current. Without `force`, a concurrent refresh
    /// that already produced a fresh key is reused instead of generating another. Blocking.
    pub fn refresh(&self, force: bool) -> Result<CurrentKey, KeySourceError> {
        let _guard = self
            .refresh_lock
            .lock()
            .map_err(|_| KeySourceError::Internal("lock poisoned".into()))?;
        if !force {
            if let Some(k) = self.current() {
                if !k.needs_refresh(self.clock.now_unix(), self.cfg.key_refresh_ahead_secs) {
                    return Ok(k);
                }
            }
        }
        let info = self.keys.generate()?;
        let k = CurrentKey {
            key_id: info.key.key_id,
            public_key: info.key.public_key,
            expires_at: info.key.expires_at,
            tolerance_seconds: info.tolerance_seconds,
        };
        if let Err(e) = self.cache.save(&k) {
            // The key is still usable from memory; a restart will fetch another one.
            tracing::warn!(error = %e, "AIS could not persist the current key");
        }
        if let Ok(mut g) = self.current.lock() {
            *g = Some(k);
        }
        tracing::info!(
            key_id = k.key_id,
            expires_at = k.expires_at,
            "AIS key refreshed"
        );
        Ok(k)
    }

    /// Refresh when the current key is missing or close to expiry. Blocking.
    pub fn refresh_if_needed(&self) -> Result<(), KeySourceError> {
        let now = self.clock.now_unix();
        match self.current() {
            Some(k) if !k.needs_refresh(now, self.cfg.key_refresh_ahead_secs) => Ok(()),
            _ => self.refresh(false).map(|_| ()),
        }
    }

    /// The key to issue with now, refreshing when needed. Blocking.
    pub fn key_for_issue(&self) -> Result<CurrentKey, AisError> {
        let now = self.clock.now_unix();
        let cur = self.current();
        if let Some(k) = cur {
            if !k.needs_refresh(now, self.cfg.key_refresh_ahead_secs) && k.usable(now) {
                return Ok(k);
            }
        }
        match self.refresh(false) {
            Ok(k) => Ok(k),
            Err(e) => match cur {
                Some(k) if k.usable(now) => {
                    tracing::warn!(error = %e, key_id = k.key_id, "AIS key refresh failed; still using the current key");
                    Ok(k)
                }
                _ => match e {
                    KeySourceError::Unavailable(m) => Err(AisError::KsUnavailable(m)),
                    KeySourceError::NotFound => {
                        Err(AisError::KsUnavailable("key server returned no key".into()))
                    }
                    KeySourceError::Internal(m) => Err(AisError::Internal(m)),
                },
            },
        }
    }

    /// Change the per-IP rate limit of `/ais/*` (live reload).
    pub fn set_rate_limit(&self, burst: u32, refill_secs: u64) {
        self.limiter.set_limits(burst, refill_secs);
    }

    /// Handle an encoded `RegisterRequest` (wire section 5.2): only `actr_type` and `realm` are
    /// used; the other fields decode and are ignored. Blocking.
    #[must_use = "the reply to send"]
    pub fn register(&self, body: &[u8]) -> RegisterResponse {
        let req = match RegisterRequest::decode(body) {
            Ok(r) => r,
            Err(e) => return proto::register_error(400, format!("Invalid protobuf: {e}")),
        };
        match self.issue(req) {
            Ok(ok) => RegisterResponse {
                result: Some(register_response::Result::Success(ok)),
            },
            Err(AisError::KsUnavailable(m)) => {
                tracing::warn!(error = %m, "AIS register: key server unavailable");
                proto::register_error(503, format!("Key server unavailable: {m}"))
            }
            Err(AisError::Internal(m)) => {
                tracing::error!(error = %m, "AIS register failed");
                proto::register_error(500, format!("Credential issuance failed: {m}"))
            }
        }
    }

    fn issue(&self, req: RegisterRequest) -> Result<register_response::RegisterOk, AisError> {
        let key = self.key_for_issue()?;
        let serial = self.snowflake.next(self.clock.now_unix_ms());
        let actr_id = ActrId {
            realm: req.realm,
            serial_number: serial,
            r#type: req.actr_type,
        };
        let now = self.clock.now_unix();
        // Never let a token outlive the time verifiers can fetch its key.
        let expr_time = now
            .saturating_add(self.cfg.token_ttl_secs)
            .min(key.fetchable_until());
        let mut psk = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(psk.as_mut());
        let claims = IdentityClaims {
            realm_id: actr_id.realm.realm_id,
            actor_id: proto::actr_id_string(&actr_id),
            expr_time,
            psk: psk.to_vec(),
        };
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&claims).map_err(|e| AisError::Internal(e.to_string()))?,
        );
        let token = crypto::ecies_encrypt(&key.public_key, &json)
            .map_err(|e| AisError::Internal(e.to_string()))?;
        Ok(register_response::RegisterOk {
            actr_id,
            credential: AIdCredential {
                encrypted_token: token,
                token_key_id: key.key_id,
            },
            psk: Some(psk.to_vec()),
            credential_expires_at: Some(Timestamp {
                seconds: i64::try_from(expr_time).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            signaling_heartbeat_interval_secs: self.cfg.heartbeat_interval_secs,
        })
    }

    fn health(&self) -> serde_json::Value {
        let database = self.cache.ping();
        let ks = self.keys.health();
        let now = self.clock.now_unix();
        let key_cache = match self.current() {
            Some(k) => serde_json::json!({
                "status": "ok",
                "key_id": k.key_id,
                "expires_in": if k.expires_at == 0 { u64::MAX } else { k.expires_at.saturating_sub(now) },
            }),
            None => serde_json::json!({"status": "failed", "error": "no key loaded"}),
        };
        let signing = self.signing_keys().map(|k| match k.current(now) {
            Some(c) => serde_json::json!({"status": "ok", "key_id": c.key_id, "expires_in": c.expires_at.saturating_sub(now)}),
            None => serde_json::json!({"status": "rotation due"}),
        });
        let healthy = database && ks.is_ok() && self.current().is_some();
        serde_json::json!({
            "service": "ais",
            "version": env!("CARGO_PKG_VERSION"),
            "status": if healthy { "healthy" } else { "degraded" },
            "database": if database { "ok" } else { "failed" },
            "ks_service": if ks.is_ok() { "ok" } else { "failed" },
            "key_cache": key_cache,
            "signing_key": signing,
        })
    }

    /// Background refresh: check every `min(30 s, key_refresh_ahead_secs / 2)`.
    pub(crate) async fn refresh_loop(self: Arc<Self>) {
        let period = Duration::from_secs((self.cfg.key_refresh_ahead_secs / 2).clamp(1, 30));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticker.tick().await;
            let me = self.clone();
            let res = tokio::task::spawn_blocking(move || {
                if let Some(keys) = me.signing_keys() {
                    if let Err(e) = keys.current_or_rotate(me.clock.now_unix()) {
                        tracing::warn!(error = %e, "AIS signing key rotation failed");
                    }
                }
                me.refresh_if_needed()
            })
            .await;
            match res {
                Ok(Ok(())) => failing = false,
                Ok(Err(e)) => {
                    // Log the first failure of a streak only, not one line per tick.
                    if !failing {
                        tracing::warn!(error = %e, "AIS background key refresh failed");
                    }
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}

/// Credential from the three headers, if any header is present.
fn header_credential(headers: &HeaderMap) -> Option<Result<NonceCredential, AuthError>> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if headers.get(HEADER_SIGNATURE).is_none()
        && headers.get(HEADER_NONCE).is_none()
        && headers.get(HEADER_TIMESTAMP).is_none()
    {
        return None;
    }
    let (Some(ts), Some(nonce), Some(sig)) = (
        get(HEADER_TIMESTAMP),
        get(HEADER_NONCE),
        get(HEADER_SIGNATURE),
    ) else {
        return Some(Err(AuthError::Malformed));
    };
    let Ok(timestamp) = ts.trim().parse::<u64>() else {
        return Some(Err(AuthError::Malformed));
    };
    Some(Ok(NonceCredential {
        timestamp,
        nonce: nonce.to_owned(),
        signature: sig.to_owned(),
    }))
}

fn auth_status(e: &AuthError) -> (StatusCode, &'static str) {
    match e {
        AuthError::Malformed => (StatusCode::BAD_REQUEST, "Invalid request parameters"),
        AuthError::TimestampOutOfWindow | AuthError::InvalidSignature => {
            (StatusCode::UNAUTHORIZED, "Authentication failed")
        }
        AuthError::DuplicateNonce => (StatusCode::FORBIDDEN, "Request rejected"),
        AuthError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal server error"),
    }
}

/// Whether an unsigned register from `peer` is acceptable.
#[must_use]
pub fn unsigned_register_allowed(peer: IpAddr, cfg: &AisConfig) -> bool {
    cfg.allow_unsigned_loopback_register && peer.to_canonical().is_loopback()
}

fn protobuf_response(status: StatusCode, msg: &RegisterResponse) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        msg.encode_to_vec(),
    )
        .into_response()
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"status": "error", "message": message})),
    )
        .into_response()
}

/// Verify a request signed with the shared key in the `X-Actrix-*` headers, for the admin
/// routes of this module and those mounted outside it (the appliance's reload endpoint, for
/// one). `context` keeps the nonce spaces of different callers apart.
pub async fn verify_signed_headers(
    auth: crate::nonce_auth::NonceAuthenticator,
    headers: &HeaderMap,
    context: &'static str,
    payload: String,
) -> Result<(), Response> {
    let cred = match header_credential(headers) {
        None => {
            return Err(json_error(
                StatusCode::UNAUTHORIZED,
                "Authentication required: sign with X-Actrix-Timestamp, X-Actrix-Nonce, X-Actrix-Signature",
            ))
        }
        Some(Err(e)) => {
            let (s, m) = auth_status(&e);
            return Err(json_error(s, m));
        }
        Some(Ok(c)) => c,
    };
    auth.verify_async(context, &cred, &payload)
        .await
        .map_err(|e| {
            let (s, m) = auth_status(&e);
            json_error(s, m)
        })
}

/// Verify a signed admin request (context `ais`), then run `f` on the blocking pool.
async fn signed_admin<T, F>(
    svc: Arc<AisService>,
    headers: &HeaderMap,
    payload: String,
    f: F,
) -> Result<T, Response>
where
    T: Send + 'static,
    F: FnOnce(&AisService) -> T + Send + 'static,
{
    verify_signed_headers(svc.auth.clone(), headers, AIS_CONTEXT, payload).await?;
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|_| json_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error"))
}

/// Whether a `POST /ais/register` speaks actr 0.4: `Content-Type: application/x-protobuf`, or
/// a top-level field number only the 0.4 `RegisterRequest` defines (10, 11, 13-17).
pub fn is_v4_register(headers: &HeaderMap, body: &[u8]) -> bool {
    let x_protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-protobuf"));
    x_protobuf || top_level_fields(body).any(|f| (10..=17).contains(&f))
}

/// The field numbers of a protobuf message's top level, as far as it parses.
fn top_level_fields(mut b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    std::iter::from_fn(move || {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut b)?).ok()?,
            5 => 4,
            _ => return None,
        };
        if skip > b.len() {
            return None;
        }
        b = &b[skip..];
        u32::try_from(key >> 3).ok()
    })
}

fn protobuf_bytes(bytes: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        )],
        bytes,
    )
        .into_response()
}

async fn register_handler(
    State(svc): State<Arc<AisService>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if is_v4_register(&headers, &body) {
        return match tokio::task::spawn_blocking(move || svc.register_v4(&body)).await {
            Ok(resp) => protobuf_bytes(resp.encode_to_vec()),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal server error").into_response(),
        };
    }
    let cred = match header_credential(&headers) {
        None if unsigned_register_allowed(peer.ip(), &svc.cfg) => None,
        None => {
            return protobuf_response(
                StatusCode::UNAUTHORIZED,
                &proto::register_error(
                    401,
                    "Authentication required: sign with X-Actrix-Timestamp, X-Actrix-Nonce, X-Actrix-Signature",
                ),
            )
        }
        Some(Err(e)) => {
            let (s, m) = auth_status(&e);
            return protobuf_response(s, &proto::register_error(u32::from(s.as_u16()), m));
        }
        Some(Ok(c)) => Some(c),
    };
    if let Some(cred) = cred {
        if let Err(e) = svc
            .auth
            .verify_async(AIS_CONTEXT, &cred, &register_payload(&body))
            .await
        {
            let (s, m) = auth_status(&e);
            return protobuf_response(s, &proto::register_error(u32::from(s.as_u16()), m));
        }
    }
    match tokio::task::spawn_blocking(move || svc.register(&body)).await {
        // Like Actrix: HTTP 200 with the outcome inside the message.
        Ok(resp) => protobuf_response(StatusCode::OK, &resp),
        Err(_) => protobuf_response(
            StatusCode::OK,
            &proto::register_error(500, "Internal server error"),
        ),
    }
}

async fn renew_handler(State(svc): State<Arc<AisService>>, body: Bytes) -> Response {
    match tokio::task::spawn_blocking(move || svc.renew_v4(&body)).await {
        Ok(resp) => protobuf_bytes(resp.encode_to_vec()),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal server error").into_response(),
    }
}

async fn rotate_signing_handler(
    State(svc): State<Arc<AisService>>,
    headers: HeaderMap,
) -> Response {
    let res = signed_admin(svc, &headers, "ais_rotate_signing_key".into(), |s| {
        let now = s.clock.now_unix();
        s.signing_keys()
            .map(|k| k.rotate(now).map_err(|e| e.to_string()))
    })
    .await;
    match res {
        Err(r) => r,
        Ok(Some(Ok(k))) => Json(serde_json::json!({
            "status": "success",
            "message": "Signing key rotated",
            "new_key_id": k.key_id,
            "expires_at": k.expires_at,
        }))
        .into_response(),
        Ok(Some(Err(e))) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("Signing key rotation failed: {e}"),
        ),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "actr 0.4 is not served on this node"),
    }
}

async fn rotate_handler(State(svc): State<Arc<AisService>>, headers: HeaderMap) -> Response {
    let res = signed_admin(svc, &headers, "ais_rotate_key".into(), |s| s.refresh(true)).await;
    match res {
        Err(r) => r,
        Ok(Ok(k)) => Json(serde_json::json!({
            "status": "success",
            "message": "Key rotated successfully",
            "new_key_id": k.key_id,
        }))
        .into_response(),
        Ok(Err(e)) => Json(serde_json::json!({
            "status": "error",
            "message": format!("Key rotation failed: {e}"),
        }))
        .into_response(),
    }
}

async fn current_key_handler(State(svc): State<Arc<AisService>>, headers: HeaderMap) -> Response {
    let res = signed_admin(svc, &headers, "ais_current_key".into(), |s| {
        s.key_for_issue()
    })
    .await;
    match res {
        Err(r) => r,
        Ok(Ok(k)) => {
            Json(serde_json::json!({"status": "success", "key_id": k.key_id})).into_response()
        }
        Ok(Err(e)) => {
            Json(serde_json::json!({"status": "error", "message": e.to_string()})).into_response()
        }
    }
}

/// Body of `PUT /ais/realms/{realm_id}`.
#[derive(Clone, Debug, Deserialize)]
pub struct PutRealmBody {
    pub name: String,
    pub status: crate::realms::RealmStatus,
    #[serde(default)]
    pub expires_at: Option<u64>,
}

async fn put_realm_handler(
    State(svc): State<Arc<AisService>>,
    UrlPath(realm_id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(realm_id) = realm_id.parse::<u32>() else {
        return json_error(StatusCode::BAD_REQUEST, "Invalid realm id");
    };
    let payload = put_realm_payload(realm_id, &body);
    let res = signed_admin(svc, &headers, payload, move |s| {
        let parsed: PutRealmBody = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let realm = Realm {
            realm_id,
            name: parsed.name,
            status: parsed.status,
            expires_at: parsed.expires_at,
        };
        s.realms.upsert(&realm).map_err(|e| e.to_string())?;
        Ok::<Realm, String>(realm)
    })
    .await;
    match res {
        Err(r) => r,
        Ok(Ok(realm)) => {
            tracing::info!(realm_id, status = ?realm.status, "realm provisioned");
            Json(serde_json::json!({"status": "success", "realm": realm})).into_response()
        }
        Ok(Err(e)) => json_error(StatusCode::BAD_REQUEST, &format!("Invalid realm: {e}")),
    }
}

async fn get_realm_handler(
    State(svc): State<Arc<AisService>>,
    UrlPath(realm_id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(realm_id) = realm_id.parse::<u32>() else {
        return json_error(StatusCode::BAD_REQUEST, "Invalid realm id");
    };
    let res = signed_admin(
        svc,
        &headers,
        format!("ais_get_realm:{realm_id}"),
        move |s| s.realms.get(realm_id),
    )
    .await;
    match res {
        Err(r) => r,
        Ok(Ok(Some(realm))) => {
            Json(serde_json::json!({"status": "success", "realm": realm})).into_response()
        }
        Ok(Ok(None)) => json_error(StatusCode::NOT_FOUND, "Realm not found"),
        Ok(Err(_)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error"),
    }
}

async fn health_handler(State(svc): State<Arc<AisService>>) -> Response {
    match tokio::task::spawn_blocking(move || svc.health()).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error"),
    }
}

async fn rate_limit(State(svc): State<Arc<AisService>>, req: Request, next: Next) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical());
    if let Some(ip) = ip {
        if let Err(retry_after) = svc.limiter.check(svc.clock.now_unix_ms(), ip) {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after.to_string())],
                "Too Many Requests",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Routes of the AIS, to be nested at `/ais`, behind the per-IP rate limiter.
pub fn router(svc: Arc<AisService>) -> Router {
    Router::new()
        .route("/register", post(register_handler))
        .route("/renew", post(renew_handler))
        .route("/rotate-signing-key", post(rotate_signing_handler))
        .route("/health", get(health_handler))
        .route("/rotate-key", post(rotate_handler))
        .route("/current-key", get(current_key_handler))
        .route(
            "/realms/{realm_id}",
            put(put_realm_handler).get(get_realm_handler),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(svc.clone(), rate_limit))
        .with_state(svc)
}
