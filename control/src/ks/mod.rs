//! Key Server (KS): wire reference sections 3 and 4.
//!
//! `POST /ks/generate`, `GET /ks/secret/{key_id}` and `GET /ks/health`, with the exact JSON
//! shapes, status codes and error bodies of Actrix. Every store operation runs on the blocking
//! pool because it fsyncs; the control thread's event loop never waits for the disk.

pub mod client;
pub mod grpc;
pub mod store;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;
use crate::config::SecretString;
use crate::nonce_auth::{AuthError, NonceAuthenticator, NonceCredential};
use client::{KeyInfo, KsClient, KsClientError};
use store::{KeyId, KeyStore, SecretRecord, StoreError};

/// nonce-auth context of KS requests (empty, as Actrix).
pub const KS_CONTEXT: &str = "";
/// Largest accepted KS request body.
const MAX_BODY: usize = 16 * 1024;

/// Request body of `POST /ks/generate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateKeyRequest {
    pub credential: NonceCredential,
}

/// 200 body of `POST /ks/generate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerateKeyResponse {
    pub key_id: u32,
    /// Standard base64 of the 33-byte compressed point.
    pub public_key: String,
    pub expires_at: u64,
    pub tolerance_seconds: u64,
}

/// 200 body of `GET /ks/secret/{key_id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretKeyResponse {
    pub key_id: u32,
    /// Standard base64 of the 32-byte scalar.
    pub secret_key: SecretString,
    pub expires_at: u64,
    pub tolerance_seconds: u64,
}

/// Body of every KS error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsErrorBody {
    pub error: String,
    pub code: u16,
}

/// A KS failure as the wire shows it (generic messages, wire reference section 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsError {
    BadRequest,
    Unauthorized,
    Replay,
    NotFound,
    Internal,
}

impl KsError {
    fn status(self) -> StatusCode {
        match self {
            KsError::BadRequest => StatusCode::BAD_REQUEST,
            KsError::Unauthorized => StatusCode::UNAUTHORIZED,
            KsError::Replay => StatusCode::FORBIDDEN,
            KsError::NotFound => StatusCode::NOT_FOUND,
            KsError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(self) -> &'static str {
        match self {
            KsError::BadRequest => "Invalid request parameters",
            KsError::Unauthorized => "Authentication failed",
            KsError::Replay => "Request rejected",
            KsError::NotFound => "Resource not found",
            KsError::Internal => "Internal server error",
        }
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(KsErrorBody {
            error: message.to_owned(),
            code: status.as_u16(),
        }),
    )
        .into_response()
}

impl IntoResponse for KsError {
    fn into_response(self) -> Response {
        error_response(self.status(), self.message())
    }
}

impl From<AuthError> for KsError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Malformed => KsError::BadRequest,
            AuthError::TimestampOutOfWindow | AuthError::InvalidSignature => KsError::Unauthorized,
            AuthError::DuplicateNonce => KsError::Replay,
            AuthError::Storage(_) => KsError::Internal,
        }
    }
}

impl From<StoreError> for KsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => KsError::NotFound,
            StoreError::Corrupt | StoreError::Storage(_) => KsError::Internal,
        }
    }
}

/// The local Key Server: key store plus request authentication.
#[derive(Debug)]
pub struct KsService {
    store: Arc<KeyStore>,
    auth: NonceAuthenticator,
    clock: SharedClock,
}

impl KsService {
    /// A KS over `store`, authenticating with `auth`.
    pub fn new(store: Arc<KeyStore>, auth: NonceAuthenticator) -> Self {
        let clock = auth.clock().clone();
        KsService { store, auth, clock }
    }

    /// The key store.
    pub fn store(&self) -> &Arc<KeyStore> {
        &self.store
    }

    /// Authenticated generate (payload `generate_key`): the signature and nonce on the event
    /// loop, key generation and its commit on the blocking pool.
    pub async fn generate(
        self: Arc<Self>,
        cred: &NonceCredential,
    ) -> Result<GenerateKeyResponse, KsError> {
        self.auth
            .verify_async(KS_CONTEXT, cred, "generate_key")
            .await?;
        let me = self.clone();
        let rec = blocking(move || {
            me.store.generate(me.clock.now_unix()).map_err(|e| {
                tracing::error!(error = %e, "KS generate failed");
                KsError::from(e)
            })
        })
        .await?;
        tracing::info!(
            key_id = rec.key_id,
            expires_at = rec.expires_at,
            "KS key generated"
        );
        Ok(GenerateKeyResponse {
            key_id: rec.key_id,
            public_key: base64::engine::general_purpose::STANDARD.encode(rec.public_key),
            expires_at: rec.expires_at,
            tolerance_seconds: self.store.tolerance_seconds(),
        })
    }

    /// Authenticated secret lookup (payload `get_secret_key:{key_id}`). A key served before
    /// comes from memory; otherwise it is read and decrypted on the blocking pool.
    pub async fn secret(
        self: Arc<Self>,
        key_id: KeyId,
        cred: &NonceCredential,
    ) -> Result<SecretKeyResponse, KsError> {
        self.auth
            .verify_async(KS_CONTEXT, cred, &format!("get_secret_key:{key_id}"))
            .await?;
        let now_unix = self.clock.now_unix();
        let rec = match self.store.cached_secret(now_unix, key_id) {
            Some(rec) => rec,
            None => {
                let store = self.store.clone();
                blocking(move || {
                    store.get_secret(now_unix, key_id).map_err(|e| {
                        if e != StoreError::NotFound {
                            tracing::error!(key_id, error = %e, "KS secret lookup failed");
                        }
                        KsError::from(e)
                    })
                })
                .await?
            }
        };
        Ok(SecretKeyResponse {
            key_id,
            secret_key: SecretString::new(
                base64::engine::general_purpose::STANDARD.encode(&rec.secret_key[..]),
            ),
            expires_at: rec.expires_at,
            tolerance_seconds: rec.tolerance_seconds,
        })
    }

    fn health(&self) -> serde_json::Value {
        let key_count = self.store.key_count().unwrap_or(0);
        serde_json::json!({
            "status": "healthy",
            "service": "ks",
            "backend": "sqlite",
            "key_count": key_count,
            "timestamp": self.clock.now_unix(),
        })
    }
}

/// Routes of the local KS, to be nested at `/ks`.
pub fn router(svc: Arc<KsService>) -> Router {
    Router::new()
        .route("/generate", post(generate_handler))
        .route("/secret/{key_id}", get(secret_handler))
        .route("/health", get(health_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(svc)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KsError> + Send + 'static,
) -> Result<T, KsError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KsError::Internal))
}

async fn generate_handler(
    State(svc): State<Arc<KsService>>,
    body: Result<Json<GenerateKeyRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        // Keep the framework's status codes (415, 400, 422, 413), as Actrix, with the KS body.
        Err(rej) => {
            let status = rej.status();
            let msg = match status {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported media type",
                StatusCode::PAYLOAD_TOO_LARGE => "Payload too large",
                _ => KsError::BadRequest.message(),
            };
            return error_response(status, msg);
        }
    };
    match svc.generate(&req.credential).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Extract the credential from the query in the three forms of wire reference section 3.1.
fn credential_from_query(pairs: &[(String, String)]) -> Result<NonceCredential, KsError> {
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(json) = first("credential") {
        return serde_json::from_str(json).map_err(|_| KsError::BadRequest);
    }
    let field = |name: &str| {
        first(&format!("credential.{name}"))
            .or_else(|| first(&format!("credential[{name}]")))
            .ok_or(KsError::BadRequest)
    };
    Ok(NonceCredential {
        timestamp: field("timestamp")?
            .parse()
            .map_err(|_| KsError::BadRequest)?,
        nonce: field("nonce")?.to_owned(),
        signature: field("signature")?.to_owned(),
    })
}

async fn secret_handler(
    State(svc): State<Arc<KsService>>,
    Path(path_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    // The path/query key_id check comes before authentication (wire reference section 3.1).
    let key_id: KeyId = match path_id.parse() {
        Ok(id) => id,
        Err(_) => return KsError::BadRequest.into_response(),
    };
    let query_id = pairs
        .iter()
        .find(|(k, _)| k == "key_id")
        .and_then(|(_, v)| v.parse::<KeyId>().ok());
    if query_id != Some(key_id) {
        return KsError::BadRequest.into_response();
    }
    let cred = match credential_from_query(&pairs) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match svc.secret(key_id, &cred).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn health_handler(State(svc): State<Arc<KsService>>) -> Response {
    match tokio::task::spawn_blocking(move || svc.health()).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => KsError::Internal.into_response(),
    }
}

/// Where the AIS and the TURN identity verifier get keys: the local store directly, or a remote
/// KS through the signed client. Both behave the same way.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// The KS runs in this process.
    Local {
        store: Arc<KeyStore>,
        clock: SharedClock,
    },
    /// A remote KS.
    Remote(KsClient),
    /// No KS configured: every lookup fails as unavailable.
    Unconfigured,
}

/// Key lookup failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySourceError {
    /// Unknown key, or expired beyond tolerance.
    #[error("key not found")]
    NotFound,
    /// The KS cannot be reached or refused us; retry later.
    #[error("key server unavailable: {0}")]
    Unavailable(String),
    /// A local failure (storage, corrupt row, bad response).
    #[error("key server failure: {0}")]
    Internal(String),
}

impl From<KsClientError> for KeySourceError {
    fn from(e: KsClientError) -> Self {
        match e {
            KsClientError::NotFound => KeySourceError::NotFound,
            KsClientError::Unavailable(_) | KsClientError::Rejected { .. } => {
                KeySourceError::Unavailable(e.to_string())
            }
            KsClientError::Protocol(m) => KeySourceError::Internal(m),
        }
    }
}

impl From<StoreError> for KeySourceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => KeySourceError::NotFound,
            other => KeySourceError::Internal(other.to_string()),
        }
    }
}

impl KeySource {
    /// Generate a new key pair. Blocking.
    pub fn generate(&self) -> Result<KeyInfo, KeySourceError> {
        match self {
            KeySource::Local { store, clock } => {
                let key = store.generate(clock.now_unix())?;
                Ok(KeyInfo {
                    key,
                    tolerance_seconds: store.tolerance_seconds(),
                })
            }
            KeySource::Remote(c) => Ok(c.generate_key()?),
            KeySource::Unconfigured => Err(KeySourceError::Unavailable(
                "no key server configured".into(),
            )),
        }
    }

    /// The secret key `key_id`. Blocking.
    pub fn secret(&self, key_id: KeyId) -> Result<SecretRecord, KeySourceError> {
        match self {
            KeySource::Local { store, clock } => Ok(store.get_secret(clock.now_unix(), key_id)?),
            KeySource::Remote(c) => Ok(c.get_secret_key(key_id)?),
            KeySource::Unconfigured => Err(KeySourceError::Unavailable(
                "no key server configured".into(),
            )),
        }
    }

    /// Whether the KS is reachable. Blocking.
    pub fn health(&self) -> Result<(), String> {
        match self {
            KeySource::Local { store, .. } => {
                store.key_count().map(|_| ()).map_err(|e| e.to_string())
            }
            KeySource::Remote(c) => c.health().map(|_| ()).map_err(|e| e.to_string()),
            KeySource::Unconfigured => Err("no key server configured".into()),
        }
    }

    /// True when lookups may block on the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, KeySource::Remote(_))
    }
}
