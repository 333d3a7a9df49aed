//! The server under test: its address, what it is, its credentials and its process.

use crate::scenario::Transport;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha1::Sha1;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// An RFC 8489/8656 STUN/TURN server (actrix, coturn, ...).
    Turn,
    /// The bare forwarder/echo of `actrix-bench reference`.
    Reference,
}

#[derive(Debug, Clone)]
pub enum Credentials {
    /// Long-term credentials.
    Static { user: String, password: String },
    /// TURN REST API credentials (draft-uberti-behave-turn-rest): username
    /// "<unix expiry>:<name>", password base64(HMAC-SHA1(secret, username)).
    Rest {
        secret: String,
        name: String,
        ttl_secs: u64,
    },
}

impl Credentials {
    /// The (username, password) pair to use now.
    pub fn resolve(&self, now_unix: u64) -> (String, String) {
        match self {
            Credentials::Static { user, password } => (user.clone(), password.clone()),
            Credentials::Rest {
                secret,
                name,
                ttl_secs,
            } => {
                let user = format!("{}:{}", now_unix + ttl_secs, name);
                (user.clone(), rest_password(secret, &user))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Credentials::Static { user, .. } => format!("static user {user:?}"),
            Credentials::Rest { name, ttl_secs, .. } => {
                format!("REST name {name:?} ttl {ttl_secs}s")
            }
        }
    }
}

/// base64(HMAC-SHA1(secret, username)), the TURN REST password.
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac =
        <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    /// The STUN/TURN address over UDP (or the reference forwarder's).
    pub addr: SocketAddr,
    /// The TURN-over-TCP listener (`None`: scenarios over TCP fail).
    pub tcp: Option<SocketAddr>,
    /// The TURN-over-TLS listener.
    pub tls: Option<SocketAddr>,
    pub kind: TargetKind,
    pub creds: Option<Credentials>,
    /// The server process whose CPU and memory are read; `None`: not measured.
    pub pid: Option<u32>,
    /// The appliance's HTTP base URL (`http://127.0.0.1:8080`) for the KS, AIS and
    /// signaling scenarios.
    pub http: Option<String>,
    /// The KS/AIS shared key, for signed requests.
    pub shared_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    pub label: String,
    pub addr: String,
    pub kind: TargetKind,
    pub tcp: Option<String>,
    pub tls: Option<String>,
    pub credentials: String,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub http: Option<String>,
}

impl Target {
    /// Where clients over `transport` connect (the UDP address for UDP).
    pub fn addr_for(&self, transport: Transport) -> Result<SocketAddr, String> {
        match transport {
            Transport::Udp => Ok(self.addr),
            Transport::Tcp => self
                .tcp
                .ok_or_else(|| "a scenario over TCP needs the server's --tcp address".into()),
            Transport::Tls => self
                .tls
                .ok_or_else(|| "a scenario over TLS needs the server's --tls address".into()),
        }
    }

    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            label: self.label.clone(),
            addr: self.addr.to_string(),
            kind: self.kind,
            tcp: self.tcp.map(|a| a.to_string()),
            tls: self.tls.map(|a| a.to_string()),
            credentials: self
                .creds
                .as_ref()
                .map(|c| c.describe())
                .unwrap_or_else(|| "none".into()),
            pid: self.pid,
            process: self.pid.and_then(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .ok()
                    .map(|s| s.trim().to_string())
            }),
            http: self.http.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_credentials() {
        let c = Credentials::Rest {
            secret: "north".into(),
            name: "bench".into(),
            ttl_secs: 3600,
        };
        let (u, p) = c.resolve(1_000_000);
        assert_eq!(u, "1003600:bench");
        // HMAC-SHA1 is 20 bytes: 28 base64 characters with one '='.
        assert_eq!(p.len(), 28);
        assert_eq!(p, rest_password("north", "1003600:bench"));
        assert_ne!(p, rest_password("south", "1003600:bench"));
        // RFC 2202 test case 2, base64 of effcdf6ae5eb2fa2d27416d5f184df9c259a7c79.
        assert_eq!(
            rest_password("Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }
}
