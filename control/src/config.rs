//! Configuration of the control plane and the bootstrap of its secrets.
//!
//! The appliance composes these sections into its TOML file (`[http]`, `[services]`, `[ks]`,
//! `[ais]`); unknown keys are detected by the appliance, not here, so none of these types denies
//! unknown fields. Every field has a default so an empty section is valid.
//!
//! Secrets (the nonce-auth shared key and the key-encryption key) never appear in `Debug`
//! output: they are held in [`SecretString`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::Kek;
use crate::error::ControlError;

/// File name of the generated shared key inside `data_dir`.
pub const SHARED_KEY_FILE: &str = "shared_key";
/// File name of the generated KEK inside `data_dir`.
pub const KEK_FILE: &str = "kek";
/// File name of the Key Server database inside `data_dir`.
pub const KS_DB_FILE: &str = "ks.db";
/// File name of the control database (nonces, realms, AIS key cache) inside `data_dir`.
pub const CONTROL_DB_FILE: &str = "control.db";
/// File name of the AIS's Ed25519 signing keys (actr 0.4 credentials) inside `data_dir`.
pub const AIS_SIGNING_DB_FILE: &str = "ais_signing.db";
/// File name of the generated TURN REST secret inside `data_dir` (used when
/// `turn.rest_secrets` is empty; the appliance then gives it to the TURN server too).
pub const TURN_SECRET_FILE: &str = "turn_rest_secret";

/// Minimum length of the shared key (Actrix rule, wire reference section 4).
pub const MIN_SHARED_KEY_LEN: usize = 16;

/// A secret string. `Debug` and `Display` print `<redacted>`; the value is wiped on drop.
#[derive(Clone, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        SecretString(value.to_owned())
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        SecretString(value)
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[http]`: the control-plane HTTP listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8080`: loopback, because the KS and AIS admin routes
    /// are internal (wire reference section 9.6).
    pub listen: SocketAddr,
    /// PEM certificate chain. HTTPS (rustls) is used when both `tls_cert` and `tls_key` are set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Connections open at once, all sources together (WebSockets included: a connection
    /// counts until its descriptor is closed). More are accepted and closed at once. The
    /// appliance lowers this at start to what RLIMIT_NOFILE leaves after the data plane's
    /// reserve (see the README, "Descriptors").
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Seconds from accept until the first bytes of a request arrive and show its protocol
    /// (for HTTPS: the TLS handshake included). A connection that sends nothing, or a
    /// cleartext HTTP/2 preface (nothing here speaks HTTP/2), is closed.
    pub first_bytes_timeout_secs: u64,
    /// Seconds a request header may take to arrive complete, and the longest a keep-alive
    /// connection waits idle for its next request (slowloris).
    pub header_read_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
            tls_cert: None,
            tls_key: None,
            max_connections: 25_000,
            max_connections_per_ip: 128,
            first_bytes_timeout_secs: 5,
            header_read_timeout_secs: 10,
        }
    }
}

impl HttpConfig {
    /// True when HTTPS is configured.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }
}

/// Actrix service bits (wire reference section 2).
pub mod service_bits {
    /// Signaling WebSocket hub.
    pub const SIGNALING: u32 = 1;
    /// STUN responder.
    pub const STUN: u32 = 2;
    /// TURN relay.
    pub const TURN: u32 = 4;
    /// Actor Identity Service.
    pub const AIS: u32 = 8;
    /// Key Server.
    pub const KS: u32 = 16;
    /// All bits.
    pub const ALL: u32 = 31;
}

/// `[services]`: which services run.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ServicesConfig {
    /// Serve the Key Server routes (`/ks/*`). Default true.
    pub ks: bool,
    /// Serve the Actor Identity Service routes (`/ais/*`). Default true.
    pub ais: bool,
    /// Signaling (mounted by the signaling crate). Default true.
    pub signaling: bool,
    /// Actrix bitmask (1 Signaling, 2 STUN, 4 TURN, 8 AIS, 16 KS). When present it overrides
    /// the named switches.
    pub enable: Option<u32>,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            ks: true,
            ais: true,
            signaling: true,
            enable: None,
        }
    }
}

impl ServicesConfig {
    fn bit(&self, bit: u32, named: bool) -> bool {
        match self.enable {
            Some(mask) => mask & bit != 0,
            None => named,
        }
    }

    /// Whether the Key Server service is on (it is served locally unless `ks.remote_url` is set).
    pub fn ks_enabled(&self) -> bool {
        self.bit(service_bits::KS, self.ks)
    }

    /// Whether the Actor Identity Service is on.
    pub fn ais_enabled(&self) -> bool {
        self.bit(service_bits::AIS, self.ais)
    }

    /// Whether signaling is on.
    pub fn signaling_enabled(&self) -> bool {
        self.bit(service_bits::SIGNALING, self.signaling)
    }

    /// Whether STUN is on (only the bitmask can turn it off).
    pub fn stun_enabled(&self) -> bool {
        self.bit(service_bits::STUN, true)
    }

    /// Whether TURN is on (only the bitmask can turn it off).
    pub fn turn_enabled(&self) -> bool {
        self.bit(service_bits::TURN, true)
    }
}

/// `[ks]`: the Key Server and the nonce-auth shared key.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct KsConfig {
    /// Lifetime of generated keys. 0 = keys never expire. Default 3600.
    pub key_ttl_seconds: u64,
    /// Grace period after expiry during which secret keys are still served. Default 3600.
    pub tolerance_seconds: u64,
    /// Key-encryption key: 64 hex characters or base64 of 32 bytes.
    pub kek: Option<SecretString>,
    /// Environment variable holding the KEK (takes priority over `kek`).
    pub kek_env: Option<String>,
    /// File holding the KEK (takes priority over `kek_env` and `kek`).
    pub kek_file: Option<PathBuf>,
    /// nonce-auth shared key (Actrix `actrix_shared_key`).
    pub shared_key: Option<SecretString>,
    /// File holding the shared key (priority over `shared_key_env` and `shared_key`).
    pub shared_key_file: Option<PathBuf>,
    /// Environment variable holding the shared key (priority over `shared_key`).
    pub shared_key_env: Option<String>,
    /// Base URL of a remote Key Server (e.g. `https://ks.internal:8443`). When set, the local
    /// KS routes are off and AIS and TURN verification use the remote one.
    pub remote_url: Option<String>,
    /// Bound of the replay-nonce table (rows). Default 100 000.
    pub nonce_store_capacity: usize,
    /// Where to serve the KS gRPC API `ks.v1.KeyServer` for upstream Actrix components
    /// (upstream listens on `127.0.0.1:50052`). Off by default; local KS only.
    pub grpc_listen: Option<std::net::SocketAddr>,
}

impl Default for KsConfig {
    fn default() -> Self {
        KsConfig {
            key_ttl_seconds: 3600,
            tolerance_seconds: 3600,
            kek: None,
            kek_env: None,
            kek_file: None,
            shared_key: None,
            shared_key_file: None,
            shared_key_env: None,
            remote_url: None,
            nonce_store_capacity: 100_000,
            grpc_listen: None,
        }
    }
}

/// `[ais]`: the Actor Identity Service.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AisConfig {
    /// Lifetime of issued credentials. Default 3600.
    pub token_ttl_secs: u64,
    /// `RegisterOk.signaling_heartbeat_interval_secs`. Default 30.
    pub heartbeat_interval_secs: u32,
    /// Fetch a new KS key when the current one expires within this many seconds. Default 600.
    pub key_refresh_ahead_secs: u64,
    /// Per-IP token bucket on `/ais/*`: burst. Default 100 (Actrix).
    pub rate_limit_burst: u32,
    /// Per-IP token bucket on `/ais/*`: one token per this many seconds. Default 2 (Actrix).
    pub rate_limit_refill_secs: u64,
    /// Accept unsigned `POST /ais/register` from loopback peers. Default true. Turn it off when
    /// a reverse proxy on the same host forwards outside traffic to the control listener.
    pub allow_unsigned_loopback_register: bool,
    /// actr 0.4: lifetime of a renewal token (`POST /ais/renew`). Default 86400.
    pub renewal_ttl_secs: u64,
    /// actr 0.4: how long a new Ed25519 signing key signs. Default 86400.
    pub signing_key_ttl_secs: u64,
    /// actr 0.4: how long after its `expires_at` a signing key's signatures still verify.
    /// Default 3600.
    pub signing_key_tolerance_secs: u64,
}

impl Default for AisConfig {
    fn default() -> Self {
        AisConfig {
            token_ttl_secs: 3600,
            heartbeat_interval_secs: 30,
            key_refresh_ahead_secs: 600,
            rate_limit_burst: 100,
            rate_limit_refill_secs: 2,
            allow_unsigned_loopback_register: true,
            renewal_ttl_secs: 86_400,
            signing_key_ttl_secs: 86_400,
            signing_key_tolerance_secs: 3600,
        }
    }
}

/// Everything the control thread needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ControlConfig {
    /// Node identity (used in the Snowflake worker id and in logs).
    pub node_id: String,
    /// Directory of the SQLite databases and generated secrets.
    pub data_dir: PathBuf,
    /// TURN realm used in the long-term key derivation. Default `actor-rtc.local`.
    pub turn_realm: String,
    pub http: HttpConfig,
    pub services: ServicesConfig,
    pub ks: KsConfig,
    pub ais: AisConfig,
    /// The TURN REST secret the AIS mints actr 0.4 TURN credentials with: the first
    /// `turn.rest_secrets` entry, or (when there is none) one generated in `data_dir`.
    #[serde(skip)]
    pub turn_rest_secret: Option<SecretString>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            node_id: "actrix".to_owned(),
            data_dir: PathBuf::from("/var/lib/actrix"),
            turn_realm: "actor-rtc.local".to_owned(),
            http: HttpConfig::default(),
            services: ServicesConfig::default(),
            ks: KsConfig::default(),
            ais: AisConfig::default(),
            turn_rest_secret: None,
        }
    }
}

/// Check a shared key against the Actrix rules; `None` when acceptable.
pub fn shared_key_problem(key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    if key.chars().count() < MIN_SHARED_KEY_LEN {
        Some(format!(
            "must be at least {MIN_SHARED_KEY_LEN} characters long"
        ))
    } else if lower.contains("default") || lower.contains("change") {
        Some("must not contain \"default\" or \"change\" (looks like a placeholder)".to_owned())
    } else {
        None
    }
}

impl ControlConfig {
    /// True when this process serves the Key Server itself.
    pub fn ks_is_local(&self) -> bool {
        self.services.ks_enabled() && self.ks.remote_url.is_none()
    }

    /// Return every problem found, each naming its key. Empty means valid. Secrets given by
    /// file or environment are checked by [`ControlConfig::resolve_secrets`].
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));

        if self.node_id.trim().is_empty() {
            bad("node_id", "must not be empty".into());
        } else if self.node_id.len() > 128 {
            bad("node_id", "must be at most 128 bytes".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            bad("data_dir", "must not be empty".into());
        }
        if self.turn_realm.is_empty() {
            bad("turn_realm", "must not be empty".into());
        } else if self.turn_realm.len() > 763 {
            bad(
                "turn_realm",
                "must be at most 763 bytes (RFC 8489 REALM)".into(),
            );
        }

        if self.http.max_connections == 0 {
            bad("http.max_connections", "must be greater than 0".into());
        }
        if self.http.max_connections_per_ip == 0 {
            bad(
                "http.max_connections_per_ip",
                "must be greater than 0".into(),
            );
        } else if self.http.max_connections_per_ip > self.http.max_connections {
            bad(
                "http.max_connections_per_ip",
                format!(
                    "{} exceeds http.max_connections = {}",
                    self.http.max_connections_per_ip, self.http.max_connections
                ),
            );
        }
        for (key, v) in [
            (
                "http.first_bytes_timeout_secs",
                self.http.first_bytes_timeout_secs,
            ),
            (
                "http.header_read_timeout_secs",
                self.http.header_read_timeout_secs,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                bad(key, format!("{v} is not between 1 and 3600"));
            }
        }

        match (&self.http.tls_cert, &self.http.tls_key) {
            (Some(_), None) => bad("http.tls_key", "required when http.tls_cert is set".into()),
            (None, Some(_)) => bad("http.tls_cert", "required when http.tls_key is set".into()),
            _ => {}
        }

        if let Some(mask) = self.services.enable {
            if mask > service_bits::ALL {
                bad(
                    "services.enable",
                    format!("{mask} has bits outside 1|2|4|8|16"),
                );
            }
        }

        if let Some(key) = &self.ks.shared_key {
            if self.ks.shared_key_file.is_none() && self.ks.shared_key_env.is_none() {
                if let Some(p) = shared_key_problem(key.expose()) {
                    bad("ks.shared_key", p);
                }
            }
        }
        if let Some(kek) = &self.ks.kek {
            if self.ks.kek_file.is_none() && self.ks.kek_env.is_none() {
                if let Err(e) = Kek::parse(kek.expose()) {
                    bad("ks.kek", e);
                }
            }
        }
        if let Some(env) = &self.ks.kek_env {
            if env.is_empty() {
                bad("ks.kek_env", "must not be empty".into());
            }
        }
        if let Some(env) = &self.ks.shared_key_env {
            if env.is_empty() {
                bad("ks.shared_key_env", "must not be empty".into());
            }
        }
        if let Some(url) = &self.ks.remote_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bad(
                    "ks.remote_url",
                    "must start with http:// or https://".into(),
                );
            }
            if self.ks.shared_key.is_none()
                && self.ks.shared_key_env.is_none()
                && self.ks.shared_key_file.is_none()
            {
                bad(
                    "ks.shared_key",
                    "required when ks.remote_url is set (it must equal the remote KS's key)".into(),
                );
            }
        }
        if self.ks.nonce_store_capacity < 100 {
            bad("ks.nonce_store_capacity", "must be at least 100".into());
        }

        if self.ais.token_ttl_secs == 0 {
            bad("ais.token_ttl_secs", "must be greater than 0".into());
        }
        if self.ks.key_ttl_seconds != 0 {
            // A token issued just before a key refresh lives until
            // key.expires_at - refresh_ahead + token_ttl, and verifiers can fetch the key only
            // until expires_at + tolerance (wire reference section 5.2).
            let limit = self
                .ais
                .key_refresh_ahead_secs
                .saturating_add(self.ks.tolerance_seconds);
            if self.ais.token_ttl_secs > limit {
                bad(
                    "ais.token_ttl_secs",
                    format!(
                        "{} exceeds ais.key_refresh_ahead_secs + ks.tolerance_seconds = {limit}; \
                         tokens would outlive their key",
                        self.ais.token_ttl_secs
                    ),
                );
            }
            if self.ais.key_refresh_ahead_secs >= self.ks.key_ttl_seconds {
                bad(
                    "ais.key_refresh_ahead_secs",
                    "must be smaller than ks.key_ttl_seconds".into(),
                );
            }
        }
        if self.ais.renewal_ttl_secs == 0 {
            bad("ais.renewal_ttl_secs", "must be greater than 0".into());
        }
        if self.ais.signing_key_ttl_secs <= self.ais.key_refresh_ahead_secs {
            bad(
                "ais.signing_key_ttl_secs",
                format!(
                    "must be greater than ais.key_refresh_ahead_secs ({})",
                    self.ais.key_refresh_ahead_secs
                ),
            );
        }
        if self.ais.heartbeat_interval_secs == 0 {
            bad(
                "ais.heartbeat_interval_secs",
                "must be greater than 0".into(),
            );
        }
        if self.ais.rate_limit_burst == 0 {
            bad("ais.rate_limit_burst", "must be greater than 0".into());
        }
        if self.ais.rate_limit_refill_secs == 0 {
            bad(
                "ais.rate_limit_refill_secs",
                "must be greater than 0".into(),
            );
        }
        if self.services.ais_enabled()
            && !self.services.ks_enabled()
            && self.ks.remote_url.is_none()
        {
            bad(
                "services.ais",
                "AIS needs a Key Server: enable services.ks or set ks.remote_url".into(),
            );
        }
        problems
    }

    /// Resolve the shared key and the KEK from files, environment or `data_dir`, generating
    /// them on first start. Afterwards `ks.shared_key` (and `ks.kek` when the KS is local) hold
    /// the values. Returns notes for the log; they name files, never secrets.
    pub fn resolve_secrets(&mut self) -> Result<Vec<String>, ControlError> {
        let mut notes = Vec::new();
        ensure_private_dir(&self.data_dir)?;

        // Shared key: file > env > direct > generated in data_dir.
        let shared = if let Some(path) = &self.ks.shared_key_file {
            let v = read_secret_file(path, &mut notes)?;
            notes.push(format!("shared key loaded from {}", path.display()));
            Some(v)
        } else if let Some(var) = &self.ks.shared_key_env {
            let v = std::env::var(var).map_err(|_| {
                ControlError::Secret(format!(
                    "ks.shared_key_env: environment variable {var} is not set or not UTF-8"
                ))
            })?;
            notes.push(format!("shared key loaded from environment variable {var}"));
            Some(Zeroizing::new(v.trim().to_owned()))
        } else {
            self.ks
                .shared_key
                .as_ref()
                .map(|s| Zeroizing::new(s.expose().to_owned()))
        };
        let shared = match shared {
            Some(v) => v,
            None => {
                if self.ks.remote_url.is_some() {
                    return Err(ControlError::Secret(
                        "ks.shared_key: required when ks.remote_url is set".into(),
                    ));
                }
                let path = self.data_dir.join(SHARED_KEY_FILE);
                if path.exists() {
                    let v = read_secret_file(&path, &mut notes)?;
                    notes.push(format!("shared key loaded from {}", path.display()));
                    v
                } else {
                    let v = loop {
                        let mut raw = Zeroizing::new([0u8; 32]);
                        rand::thread_rng().fill_bytes(raw.as_mut());
                        let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*raw);
                        if shared_key_problem(&s).is_none() {
                            break Zeroizing::new(s);
                        }
                    };
                    write_secret_file(&path, v.as_bytes())?;
                    notes.push(format!(
                        "generated a new shared key in {} (owner-only); give it to remote KS clients",
                        path.display()
                    ));
                    v
                }
            }
        };
        if let Some(p) = shared_key_problem(&shared) {
            return Err(ControlError::Secret(format!("ks.shared_key: {p}")));
        }
        self.ks.shared_key = Some(SecretString::new(shared.as_str()));
        self.ks.shared_key_file = None;
        self.ks.shared_key_env = None;

        // KEK: the local KS and the AIS's signing keys need one. file > env > direct >
        // generated in data_dir.
        if self.ks_is_local() || self.services.ais_enabled() {
            let kek_text = if let Some(path) = &self.ks.kek_file {
                let v = read_secret_file(path, &mut notes)?;
                notes.push(format!("KEK loaded from {}", path.display()));
                Some(v)
            } else if let Some(var) = &self.ks.kek_env {
                let v = std::env::var(var).map_err(|_| {
                    ControlError::Secret(format!(
                        "ks.kek_env: environment variable {var} is not set or not UTF-8"
                    ))
                })?;
                notes.push(format!("KEK loaded from environment variable {var}"));
                Some(Zeroizing::new(v.trim().to_owned()))
            } else {
                self.ks
                    .kek
                    .as_ref()
                    .map(|s| Zeroizing::new(s.expose().to_owned()))
            };
            let kek_text = match kek_text {
                Some(v) => v,
                None => {
                    let path = self.data_dir.join(KEK_FILE);
                    if path.exists() {
                        let v = read_secret_file(&path, &mut notes)?;
                        notes.push(format!("KEK loaded from {}", path.display()));
                        v
                    } else {
                        let db = [KS_DB_FILE, AIS_SIGNING_DB_FILE]
                            .iter()
                            .map(|f| self.data_dir.join(f))
                            .find(|p| p.exists());
                        if let Some(db) = db {
                            // Generating a fresh KEK here would make every stored key
                            // undecryptable and invite overwriting the real one later.
                            return Err(ControlError::Kek {
                                path: db,
                                message: format!(
                                    "the key store exists but its KEK is missing ({} not found and \
                                     none of ks.kek, ks.kek_env, ks.kek_file is set); restore the KEK",
                                    path.display()
                                ),
                            });
                        }
                        let mut raw = Zeroizing::new([0u8; 32]);
                        rand::thread_rng().fill_bytes(raw.as_mut());
                        let v = Zeroizing::new(hex::encode(*raw));
                        write_secret_file(&path, v.as_bytes())?;
                        notes.push(format!(
                            "generated a new key-encryption key in {} (owner-only); back it up with the database",
                            path.display()
                        ));
                        v
                    }
                }
            };
            Kek::parse(&kek_text).map_err(|e| ControlError::Secret(format!("ks.kek: {e}")))?;
            self.ks.kek = Some(SecretString::new(kek_text.as_str()));
            self.ks.kek_file = None;
            self.ks.kek_env = None;
        }

        // TURN REST secret of actr 0.4 TURN credentials: configured, or kept in data_dir.
        if self.turn_rest_secret.is_none() && self.services.ais_enabled() {
            let path = self.data_dir.join(TURN_SECRET_FILE);
            let v = if path.exists() {
                read_secret_file(&path, &mut notes)?
            } else {
                let mut raw = Zeroizing::new([0u8; 32]);
                rand::thread_rng().fill_bytes(raw.as_mut());
                let v =
                    Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*raw));
                write_secret_file(&path, v.as_bytes())?;
                notes.push(format!(
                    "generated a TURN REST secret in {} (owner-only) for actr 0.4 TURN credentials",
                    path.display()
                ));
                v
            };
            self.turn_rest_secret = Some(SecretString::new(v.as_str()));
        }
        Ok(notes)
    }

    /// The resolved KEK, if any.
    pub(crate) fn kek(&self) -> Result<Option<Kek>, String> {
        match &self.ks.kek {
            Some(s) => Kek::parse(s.expose()).map(Some),
            None => Ok(None),
        }
    }
}

/// Create `dir` (mode 0700 when new).
fn ensure_private_dir(dir: &Path) -> Result<(), ControlError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| ControlError::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| ControlError::io(dir, e))
}

fn read_secret_file(
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<Zeroizing<String>, ControlError> {
    let meta = fs::metadata(path).map_err(|e| ControlError::io(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        notes.push(format!(
            "warning: {} is accessible by group or others (mode {:o}); run chmod 600 on it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| ControlError::io(path, e))?);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ControlError::Secret(format!("{} is empty", path.display())));
    }
    Ok(Zeroizing::new(trimmed.to_owned()))
}

/// Write a new secret file with owner-only permissions, durably.
fn write_secret_file(path: &Path, content: &[u8]) -> Result<(), ControlError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ControlError::io(path, e))?;
    f.write_all(content)
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| ControlError::io(path, e))?;
    if let Some(parent) = path.parent() {
        // Make the directory entry durable too; failure here is not fatal.
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
