//! Signed HTTP client of the Key Server API (wire reference section 3).
//!
//! Blocking on purpose: it is called from plain threads and, on the control thread, from
//! `spawn_blocking`, so a slow or unreachable KS never stalls the HTTP event loop. It works the
//! same against the local KS (`http://127.0.0.1:<port>`) and a remote one.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::clock::{system_clock, SharedClock};
use crate::crypto::{PUBLIC_KEY_LEN, SECRET_KEY_LEN};
use crate::ks::store::{KeyRecord, SecretRecord};
use crate::ks::{GenerateKeyResponse, KsErrorBody, SecretKeyResponse};
use crate::nonce_auth::{make_credential, NonceCredential};

/// Largest KS response body accepted.
const MAX_RESPONSE: u64 = 64 * 1024;

/// KS client failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KsClientError {
    /// Transport failure or timeout: the KS may be down; retry later.
    #[error("key server unavailable: {0}")]
    Unavailable(String),
    /// 404: unknown key, or expired beyond tolerance.
    #[error("key not found")]
    NotFound,
    /// The KS refused the request (bad shared key, clock skew, replay, ...).
    #[error("key server rejected the request: HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The KS answered something this client cannot use.
    #[error("unexpected key server response: {0}")]
    Protocol(String),
}

impl KsClientError {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            KsClientError::Unavailable(_) => true,
            KsClientError::Rejected { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Signed KS client.
#[derive(Clone)]
pub struct KsClient {
    base: String,
    secret: Arc<Zeroizing<Vec<u8>>>,
    agent: ureq::Agent,
    clock: SharedClock,
}

impl std::fmt::Debug for KsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KsClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl KsClient {
    /// A client of the KS at `base_url` (e.g. `http://127.0.0.1:8080`), signing with
    /// `shared_key`.
    pub fn new(base_url: &str, shared_key: &str) -> Self {
        Self::with_clock(base_url, shared_key, system_clock(), Duration::from_secs(5))
    }

    /// Same, with an explicit clock and overall request timeout.
    pub fn with_clock(
        base_url: &str,
        shared_key: &str,
        clock: SharedClock,
        timeout: Duration,
    ) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(2))))
            .max_redirects(0)
            .build();
        KsClient {
            base: base_url.trim_end_matches('/').to_owned(),
            secret: Arc::new(Zeroizing::new(shared_key.as_bytes().to_vec())),
            agent: config.into(),
            clock,
        }
    }

    /// Base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn credential(&self, payload: &str) -> NonceCredential {
        make_credential(self.clock.now_unix(), &self.secret, payload)
    }

    fn read<T: DeserializeOwned>(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, KsClientError> {
        let mut resp = resp.map_err(|e| KsClientError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_string()
            .map_err(|e| KsClientError::Unavailable(e.to_string()))?;
        match status {
            200 => serde_json::from_str(&body).map_err(|e| KsClientError::Protocol(e.to_string())),
            404 => Err(KsClientError::NotFound),
            _ => {
                let message = serde_json::from_str::<KsErrorBody>(&body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| body.chars().take(200).collect());
                Err(KsClientError::Rejected { status, message })
            }
        }
    }

    /// `POST /ks/generate`.
    pub fn generate_key(&self) -> Result<KeyInfo, KsClientError> {
        let body = serde_json::json!({ "credential": self.credential("generate_key") });
        let resp = self
            .agent
            .post(format!("{}/ks/generate", self.base))
            .header("content-type", "application/json")
            .send(body.to_string());
        let r: GenerateKeyResponse = Self::read(resp)?;
        let pk = base64::engine::general_purpose::STANDARD
            .decode(&r.public_key)
            .map_err(|_| KsClientError::Protocol("public_key is not base64".into()))?;
        let public_key: [u8; PUBLIC_KEY_LEN] = pk
            .try_into()
            .map_err(|_| KsClientError::Protocol("public_key is not 33 bytes".into()))?;
        Ok(KeyInfo {
            key: KeyRecord {
                key_id: r.key_id,
                public_key,
                expires_at: r.expires_at,
            },
            tolerance_seconds: r.tolerance_seconds,
        })
    }

    /// `GET /ks/secret/{key_id}` (credential as URL-encoded JSON, as Actrix's own client).
    pub fn get_secret_key(&self, key_id: u32) -> Result<SecretRecord, KsClientError> {
        let cred = self.credential(&format!("get_secret_key:{key_id}"));
        let cred_json =
            serde_json::to_string(&cred).map_err(|e| KsClientError::Protocol(e.to_string()))?;
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("key_id", &key_id.to_string())
            .append_pair("credential", &cred_json)
            .finish();
        let resp = self
            .agent
            .get(format!("{}/ks/secret/{key_id}?{query}", self.base))
            .call();
        let r: SecretKeyResponse = Self::read(resp)?;
        if r.key_id != key_id {
            return Err(KsClientError::Protocol("key_id mismatch".into()));
        }
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(r.secret_key.expose())
                .map_err(|_| KsClientError::Protocol("secret_key is not base64".into()))?,
        );
        if raw.len() != SECRET_KEY_LEN {
            return Err(KsClientError::Protocol("secret_key is not 32 bytes".into()));
        }
        let mut secret_key = Zeroizing::new([0u8; SECRET_KEY_LEN]);
        secret_key.copy_from_slice(&raw);
        Ok(SecretRecord {
            key_id,
            secret_key,
            expires_at: r.expires_at,
            tolerance_seconds: r.tolerance_seconds,
        })
    }

    /// `GET /ks/health`.
    pub fn health(&self) -> Result<serde_json::Value, KsClientError> {
        let resp = self.agent.get(format!("{}/ks/health", self.base)).call();
        Self::read(resp)
    }
}

/// A generated key as the KS reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key: KeyRecord,
    pub tolerance_seconds: u64,
}
