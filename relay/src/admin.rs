//! Operations: health for load balancers (`/livez`, `/readyz`), the node's load state (drain,
//! allocation and bandwidth limits) that the shards read once per Allocate, and the signed
//! session admin API (`/admin/sessions`, `/admin/disconnect`, `/admin/drain`,
//! `/admin/undrain`) with the client the `actrix sessions|disconnect|drain|undrain` commands
//! use.
//!
//! The admin routes are signed like `/admin/reload`: nonce-auth over the node's shared key
//! (context `admin`, headers `X-Actrix-Timestamp`, `X-Actrix-Nonce`, `X-Actrix-Signature`),
//! the signed payload naming the operation and its argument (`admin_disconnect:user=alice`),
//! so a signature for one operation cannot be replayed as another.
//!
//! The shards own the allocations: the HTTP handler asks the main thread, which asks every
//! shard by message ([`actrix_dataplane::DataPlane::sessions`]); nothing here touches a
//! shard's state directly.

use actrix_proto::turn::{CrossShard, Disconnect, Session};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Key Server reachability as `/readyz` reports it (0: local, nothing to reach).
const KS_UP: u8 = 1;
const KS_DOWN: u8 = 2;

/// What `/readyz` answers from, and what the shards' load flags are set from.
#[derive(Debug, Default)]
pub struct Health {
    /// An operator's drain (`actrix drain`) or the shutdown drain.
    draining: AtomicBool,
    shutting_down: AtomicBool,
    /// Relayed bandwidth over `turn.redirect_above_bytes_per_sec` (the main thread's watch).
    overloaded: AtomicBool,
    ks: AtomicU8,
    redirect_above_allocations: AtomicUsize,
    /// The data plane's shared state, once it runs (without TURN: never).
    shared: OnceLock<Arc<CrossShard>>,
}

impl Health {
    pub fn new(redirect_above_allocations: usize) -> Arc<Health> {
        let h = Health::default();
        h.redirect_above_allocations
            .store(redirect_above_allocations, Relaxed);
        Arc::new(h)
    }

    /// The data plane started: its load flags follow this node's from now on.
    pub fn attach(&self, shared: Arc<CrossShard>) {
        shared.load.set_draining(self.draining());
        shared.load.set_overloaded(self.overloaded.load(Relaxed));
        let _ = self.shared.set(shared);
    }

    pub fn set_redirect_above_allocations(&self, n: usize) {
        self.redirect_above_allocations.store(n, Relaxed);
    }

    /// Start or end a drain: new Allocates get 300 toward the alternate (or 508), existing
    /// allocations keep working. Refused (false) when ending it during shutdown.
    pub fn set_draining(&self, on: bool) -> bool {
        if !on && self.shutting_down.load(Relaxed) {
            return false;
        }
        self.draining.store(on, Relaxed);
        if let Some(s) = self.shared.get() {
            s.load.set_draining(on);
        }
        true
    }

    /// SIGTERM: drain for good.
    pub fn shutting_down(&self) {
        self.shutting_down.store(true, Relaxed);
        self.set_draining(true);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    fn set_overloaded(&self, on: bool) {
        if self.overloaded.swap(on, Relaxed) != on {
            if on {
                tracing::warn!("relayed bandwidth over turn.redirect_above_bytes_per_sec: new allocations are redirected");
            } else {
                tracing::info!("relayed bandwidth back under the limit: taking new allocations");
            }
        }
        if let Some(s) = self.shared.get() {
            s.load.set_overloaded(on);
        }
    }

    /// Why this node should get no new traffic now (empty: ready).
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if self.shutting_down.load(Relaxed) {
            why.push("shutting down");
        } else if self.draining() {
            why.push("draining");
        }
        if self.ks.load(Relaxed) == KS_DOWN {
            why.push("key server unreachable");
        }
        let limit = self.redirect_above_allocations.load(Relaxed);
        if let Some(s) = self.shared.get() {
            if limit > 0 && s.quotas.total() >= limit {
                why.push("over the allocation limit");
            }
        }
        if self.overloaded.load(Relaxed) {
            why.push("over the bandwidth limit");
        }
        why
    }
}

/// Probe a remote Key Server every few seconds for `/readyz` (a local one is always there).
/// Not ready until the first probe answers.
pub fn watch_key_server(keys: &actrix_control::ks::KeySource, health: &Arc<Health>) {
    let actrix_control::ks::KeySource::Remote(client) = keys else {
        return;
    };
    health.ks.store(KS_DOWN, Relaxed);
    let client = client.clone();
    let weak = Arc::downgrade(health);
    let spawned = std::thread::Builder::new()
        .name("actrix-ks-probe".into())
        .spawn(move || {
            let mut was = None;
            while let Some(h) = weak.upgrade() {
                let up = client.health().is_ok();
                h.ks.store(if up { KS_UP } else { KS_DOWN }, Relaxed);
                if was != Some(up) {
                    if up {
                        tracing::info!(url = client.base_url(), "remote key server reachable");
                    } else {
                        tracing::warn!(
                            url = client.base_url(),
                            "remote key server unreachable: /readyz answers 503"
                        );
                    }
                    was = Some(up);
                }
                drop(h);
                std::thread::sleep(Duration::from_secs(5));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the key server probe");
    }
}

/// The relayed-bandwidth watch, run by the main thread about once a second: over the limit
/// sets the overload flag; it clears below 90% of the limit (no flapping at the edge).
pub struct LoadWatch {
    limit: u64,
    last: Option<(Instant, u64)>,
}

impl LoadWatch {
    pub fn new(limit_bytes_per_sec: u64) -> Self {
        LoadWatch {
            limit: limit_bytes_per_sec,
            last: None,
        }
    }

    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// `total_bytes`: the relayed bytes so far (all shards, both directions).
    pub fn tick(&mut self, now: Instant, total_bytes: u64, health: &Health) {
        if self.limit == 0 {
            health.set_overloaded(false);
            self.last = None;
            return;
        }
        if let Some((t, b)) = self.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt < 0.5 {
                return;
            }
            let rate = total_bytes.saturating_sub(b) as f64 / dt;
            let over = health.overloaded.load(Relaxed);
            if rate > self.limit as f64 {
                health.set_overloaded(true);
            } else if over && rate < 0.9 * self.limit as f64 {
                health.set_overloaded(false);
            }
        }
        self.last = Some((now, total_bytes));
    }
}

/// A request of the admin routes to the main thread, which owns the data plane.
pub enum AdminRequest {
    Sessions(tokio::sync::oneshot::Sender<Vec<Session>>),
    Disconnect(Disconnect, tokio::sync::oneshot::Sender<usize>),
}

/// How long the main thread gives the shards to answer.
pub const SHARD_WAIT: Duration = Duration::from_secs(2);

/// Serve one admin request on the main thread.
pub fn serve(dp: Option<&actrix_dataplane::DataPlane>, req: AdminRequest) {
    match req {
        AdminRequest::Sessions(reply) => {
            let mut v = dp.map(|d| d.sessions(SHARD_WAIT)).unwrap_or_default();
            v.sort_by_key(|s| s.id);
            let _ = reply.send(v);
        }
        AdminRequest::Disconnect(which, reply) => {
            let n = dp.map(|d| d.disconnect(&which, SHARD_WAIT)).unwrap_or(0);
            tracing::info!(target = ?DisconnectLog(&which), allocations = n, "operator disconnect");
            let _ = reply.send(n);
        }
    }
}

struct DisconnectLog<'a>(&'a Disconnect);

impl std::fmt::Debug for DisconnectLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Disconnect::User(u) => write!(f, "user {}", String::from_utf8_lossy(u)),
            Disconnect::Allocation(id) => write!(f, "allocation {}", session_id(*id)),
        }
    }
}

/// An allocation id as operators see it: 16 hex digits.
pub fn session_id(id: u64) -> String {
    format!("{id:016x}")
}

fn session_json(s: &Session) -> serde_json::Value {
    serde_json::json!({
        "id": session_id(s.id),
        "user": String::from_utf8_lossy(&s.user),
        "client": s.client.to_string(),
        "transport": s.transport.name(),
        "relay_transport": if s.tcp { "tcp" } else { "udp" },
        "relayed": s.relayed.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "age_secs": s.age_secs,
        "expires_in_secs": s.expires_in_secs,
        "bytes_to_peer": s.bytes_to_peer,
        "bytes_to_client": s.bytes_to_client,
        "permissions": s.permissions,
        "channels": s.channels,
    })
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The argument of `/admin/disconnect`: `user=NAME` or `allocation=ID` (the request body, and
/// the signed payload after `admin_disconnect:`).
pub fn parse_disconnect(body: &str) -> Option<Disconnect> {
    let body = body.trim();
    if let Some(u) = body.strip_prefix("user=") {
        return (!u.is_empty()).then(|| Disconnect::User(u.as_bytes().into()));
    }
    let id = body.strip_prefix("allocation=")?;
    u64::from_str_radix(id, 16).ok().map(Disconnect::Allocation)
}

/// `/livez`, `/readyz` and the signed admin routes.
pub fn router(
    auth: actrix_control::nonce_auth::NonceAuthenticator,
    tx: crossbeam_channel::Sender<AdminRequest>,
    health: Arc<Health>,
) -> axum::Router {
    use axum::routing::{get, post};
    let verify = move |headers: HeaderMap, payload: String| {
        let auth = auth.clone();
        async move { actrix_control::ais::verify_signed_headers(auth, &headers, "admin", payload).await }
    };
    let (v1, v2, v3, v4) = (verify.clone(), verify.clone(), verify.clone(), verify);
    let (tx1, tx2) = (tx.clone(), tx);
    let (h1, h2, h3) = (health.clone(), health.clone(), health);
    axum::Router::new()
        // The control thread's event loop answers: the process is alive.
        .route(
            "/livez",
            get(|| async { json(StatusCode::OK, serde_json::json!({"status": "alive"})) }),
        )
        .route(
            "/readyz",
            get(move || {
                let why = h1.not_ready();
                async move {
                    if why.is_empty() {
                        json(StatusCode::OK, serde_json::json!({"ready": true}))
                    } else {
                        json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            serde_json::json!({"ready": false, "reasons": why}),
                        )
                    }
                }
            }),
        )
        .route(
            "/admin/sessions",
            post(move |headers: HeaderMap| {
                let tx = tx1.clone();
                let verify = v1.clone();
                async move {
                    if let Err(r) = verify(headers, "admin_sessions".into()).await {
                        return r;
                    }
                    let (rtx, rrx) = tokio::sync::oneshot::channel();
                    if tx.send(AdminRequest::Sessions(rtx)).is_err() {
                        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
                    }
                    match tokio::time::timeout(SHARD_WAIT * 2, rrx).await {
                        Ok(Ok(v)) => json(
                            StatusCode::OK,
                            serde_json::Value::Array(v.iter().map(session_json).collect()),
                        ),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "no answer").into_response(),
                    }
                }
            }),
        )
        .route(
            "/admin/disconnect",
            post(move |headers: HeaderMap, body: String| {
                let tx = tx2.clone();
                let verify = v2.clone();
                async move {
                    if let Err(r) =
                        verify(headers, format!("admin_disconnect:{}", body.trim())).await
                    {
                        return r;
                    }
                    let Some(which) = parse_disconnect(&body) else {
                        return json(
                            StatusCode::BAD_REQUEST,
                            serde_json::json!({"error": "body: user=NAME or allocation=ID (hex)"}),
                        );
                    };
                    let (rtx, rrx) = tokio::sync::oneshot::channel();
                    if tx.send(AdminRequest::Disconnect(which, rtx)).is_err() {
                        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
                    }
                    match tokio::time::timeout(SHARD_WAIT * 2, rrx).await {
                        Ok(Ok(n)) => json(StatusCode::OK, serde_json::json!({"disconnected": n})),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "no answer").into_response(),
                    }
                }
            }),
        )
        .route(
            "/admin/drain",
            post(move |headers: HeaderMap| {
                let verify = v3.clone();
                let health = h2.clone();
                async move {
                    if let Err(r) = verify(headers, "admin_drain".into()).await {
                        return r;
                    }
                    health.set_draining(true);
                    tracing::info!("drain asked for by the operator: new allocations go elsewhere");
                    json(StatusCode::OK, serde_json::json!({"draining": true}))
                }
            }),
        )
        .route(
            "/admin/undrain",
            post(move |headers: HeaderMap| {
                let verify = v4.clone();
                let health = h3.clone();
                async move {
                    if let Err(r) = verify(headers, "admin_undrain".into()).await {
                        return r;
                    }
                    if !health.set_draining(false) {
                        return json(
                            StatusCode::CONFLICT,
                            serde_json::json!({"error": "shutting down"}),
                        );
                    }
                    tracing::info!("drain ended by the operator: taking new allocations");
                    json(StatusCode::OK, serde_json::json!({"draining": false}))
                }
            }),
        )
}

/// The client side, for the `actrix` admin commands: the node's address and shared key come
/// from its configuration file.
pub struct Client {
    base: String,
    key: String,
}

impl Client {
    /// Read `path` (the file the node runs with) for the HTTP address and the shared key.
    pub fn from_config(path: &std::path::Path, url: Option<&str>) -> Result<Client, String> {
        let (cfg, _) = crate::config::load(Some(path)).map_err(|e| e.join("; "))?;
        let mut control = cfg.control();
        // Resolving must not create a node's secrets: the node makes them at its first start.
        if cfg.ks.shared_key.is_none()
            && cfg.ks.shared_key_file.is_none()
            && cfg.ks.shared_key_env.is_none()
            && !control
                .data_dir
                .join(actrix_control::config::SHARED_KEY_FILE)
                .exists()
        {
            return Err(format!(
                "no shared key in {} (has the node run with this configuration, and may this user read it?)",
                control.data_dir.display()
            ));
        }
        control.resolve_secrets().map_err(|e| e.to_string())?;
        let key = control
            .ks
            .shared_key
            .as_ref()
            .map(|k| k.expose().to_owned())
            .ok_or("no shared key")?;
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let mut a = cfg.http.listen;
                if a.ip().is_unspecified() {
                    a.set_ip(if a.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                let scheme = if cfg.http.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{a}")
            }
        };
        Ok(Client { base, key })
    }

    /// POST `path` signed over `payload`; the status and body.
    pub fn post(&self, path: &str, payload: &str, body: &str) -> Result<(u16, String), String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cred = actrix_control::nonce_auth::make_credential(now, self.key.as_bytes(), payload);
        let url = format!("{}{path}", self.base);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let mut resp = agent
            .post(&url)
            .header("x-actrix-timestamp", &cred.timestamp.to_string())
            .header("x-actrix-nonce", &cred.nonce)
            .header("x-actrix-signature", &cred.signature)
            .send(body)
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        Ok((status, text))
    }
}

/// `actrix sessions` output: one line per allocation.
pub fn sessions_table(sessions: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<16}  {:<20}  {:<22}  {:<9}  {:<22}  {:>7}  {:>12}  {:>12}\n",
        "ID", "USER", "CLIENT", "TRANSPORT", "RELAYED", "AGE(s)", "TO PEER(B)", "TO CLIENT(B)"
    );
    for s in sessions {
        let relayed: Vec<&str> = s["relayed"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let transport = format!(
            "{}/{}",
            s["transport"].as_str().unwrap_or("?"),
            s["relay_transport"].as_str().unwrap_or("?")
        );
        out.push_str(&format!(
            "{:<16}  {:<20}  {:<22}  {:<9}  {:<22}  {:>7}  {:>12}  {:>12}\n",
            s["id"].as_str().unwrap_or("?"),
            s["user"].as_str().unwrap_or("?"),
            s["client"].as_str().unwrap_or("?"),
            transport,
            relayed.join(","),
            s["age_secs"],
            s["bytes_to_peer"],
            s["bytes_to_client"],
        ));
    }
    out.push_str(&format!("{} allocation(s)\n", sessions.len()));
    out
}

/// Per-user counters (`actrix users`): allocations and relayed bytes summed per user, the `top`
/// users with the most allocations first (ties: more bytes, then the name), so the output
/// stays bounded however many users there are.
pub fn per_user(sessions: &[serde_json::Value], top: usize) -> Vec<serde_json::Value> {
    let mut by: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for s in sessions {
        let e = by.entry(s["user"].as_str().unwrap_or("?")).or_default();
        e.0 += 1;
        e.1 += s["bytes_to_peer"].as_u64().unwrap_or(0);
        e.2 += s["bytes_to_client"].as_u64().unwrap_or(0);
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| {
        (b.1 .0, b.1 .1 + b.1 .2)
            .cmp(&(a.1 .0, a.1 .1 + a.1 .2))
            .then(a.0.cmp(b.0))
    });
    v.truncate(top);
    v.into_iter()
        .map(|(user, (n, p, c))| {
            serde_json::json!({"user": user, "allocations": n, "bytes_to_peer": p, "bytes_to_client": c})
        })
        .collect()
}

/// `actrix users` output.
pub fn users_table(users: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<32}  {:>11}  {:>12}  {:>12}\n",
        "USER", "ALLOCATIONS", "TO PEER(B)", "TO CLIENT(B)"
    );
    for u in users {
        out.push_str(&format!(
            "{:<32}  {:>11}  {:>12}  {:>12}\n",
            u["user"].as_str().unwrap_or("?"),
            u["allocations"],
            u["bytes_to_peer"],
            u["bytes_to_client"]
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnect_arguments() {
        assert_eq!(
            parse_disconnect("user=alice"),
            Some(Disconnect::User(b"alice"[..].into()))
        );
        assert_eq!(
            parse_disconnect("allocation=00000001000000ff"),
            Some(Disconnect::Allocation(0x1_0000_00ff))
        );
        assert_eq!(parse_disconnect("user="), None);
        assert_eq!(parse_disconnect("allocation=xyz"), None);
        assert_eq!(parse_disconnect("alice"), None);
    }

    #[test]
    fn per_user_counters_are_bounded_and_ordered() {
        let s = |u: &str, b: u64| serde_json::json!({"user": u, "bytes_to_peer": b, "bytes_to_client": 1});
        let v = [s("a", 5), s("b", 1), s("b", 1), s("c", 9)];
        let top = per_user(&v, 2);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["user"], "b");
        assert_eq!(top[0]["allocations"], 2);
        assert_eq!(top[0]["bytes_to_peer"], 2);
        assert_eq!(top[1]["user"], "c");
    }

    #[test]
    fn bandwidth_watch_has_hysteresis() {
        let h = Health::default();
        let mut w = LoadWatch::new(1000);
        let t = Instant::now();
        w.tick(t, 0, &h);
        w.tick(t + Duration::from_secs(1), 2000, &h);
        assert_eq!(h.not_ready(), vec!["over the bandwidth limit"]);
        // 950 B/s: under the limit but above 90% of it: still over.
        w.tick(t + Duration::from_secs(2), 2950, &h);
        assert!(!h.not_ready().is_empty());
        w.tick(t + Duration::from_secs(3), 3000, &h);
        assert!(h.not_ready().is_empty());
    }
}
