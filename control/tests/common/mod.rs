//! Helpers shared by the integration tests: real servers on 127.0.0.1:0, real SQLite files in
//! temporary directories, signed requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use actrix_control::nonce_auth::{self, NonceCredential};
use actrix_control::{ControlBuilder, ControlConfig, ControlHandle, ManualClock};

pub const SHARED_KEY: &str = actrix_control::testing::SHARED_KEY;
pub const KEK_HEX: &str = actrix_control::testing::KEK_HEX;

/// A config on 127.0.0.1:0 with `dir` as data directory and fixed secrets.
pub fn config(dir: &Path) -> ControlConfig {
    actrix_control::testing::config(dir, "test-node")
}

pub fn start(cfg: ControlConfig) -> ControlHandle {
    ControlBuilder::new(cfg)
        .spawn()
        .expect("control plane starts")
}

pub fn start_with_clock(cfg: ControlConfig, clock: &ManualClock) -> ControlHandle {
    ControlBuilder::new(cfg)
        .clock(Arc::new(clock.clone()))
        .spawn()
        .expect("control plane starts")
}

pub fn base(h: &ControlHandle) -> String {
    base_of(h.local_addr())
}

pub fn base_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn cred(ts: u64, nonce: &str, payload: &str) -> NonceCredential {
    NonceCredential {
        timestamp: ts,
        nonce: nonce.into(),
        signature: nonce_auth::sign(SHARED_KEY.as_bytes(), ts, nonce, payload),
    }
}

/// Response status and JSON body (Null when the body is not JSON).
pub fn read_json(
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> (u16, serde_json::Value) {
    let mut resp = resp.expect("HTTP exchange");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

pub fn post_json(base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    read_json(
        agent()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .send(body),
    )
}

pub fn get(base: &str, path_and_query: &str) -> (u16, serde_json::Value) {
    read_json(agent().get(format!("{base}{path_and_query}")).call())
}

pub fn generate(base: &str, c: &NonceCredential) -> (u16, serde_json::Value) {
    post_json(
        base,
        "/ks/generate",
        &serde_json::json!({ "credential": c }).to_string(),
    )
}

pub fn secret(base: &str, key_id: u32, c: &NonceCredential) -> (u16, serde_json::Value) {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("key_id", &key_id.to_string())
        .append_pair("credential", &serde_json::to_string(c).unwrap())
        .finish();
    get(base, &format!("/ks/secret/{key_id}?{q}"))
}

/// Signed headers for the AIS admin routes.
pub fn signed_headers(ts: u64, payload: &str) -> Vec<(&'static str, String)> {
    let nonce = nonce_auth::new_nonce();
    let sig = nonce_auth::sign(SHARED_KEY.as_bytes(), ts, &nonce, payload);
    vec![
        ("x-actrix-timestamp", ts.to_string()),
        ("x-actrix-nonce", nonce),
        ("x-actrix-signature", sig),
    ]
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A KS-only config (the AIS would otherwise generate key 1 in the background).
pub fn ks_config(dir: &Path) -> ControlConfig {
    let mut cfg = config(dir);
    cfg.services.ais = false;
    cfg
}
