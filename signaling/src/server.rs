//! The WebSocket I/O layer around the [`Hub`]: admission (per-IP rate and concurrency, HTTP
//! 429 before the upgrade), URL identity validation, one reader and one writer task per
//! connection, bounded send queues, timers, and the blocking work (AIS, KS, SQLite).
//!
//! The hub and the connection table sit behind one `std::sync::Mutex`. The control thread's
//! runtime is current-thread, so the lock is never contended; it exists because axum needs
//! `Send` futures. It is never held across an `.await`.

// The I/O layer of the hub: the one place in this crate that reads clocks (see clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use actrix_control::ais::AisService;
use actrix_control::server::ControlContext;
use actrix_control::{RealmStore, SharedClock};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::SignalingConfig;
use crate::hub::{
    AisCall, ConnId, CredentialVerdict, Hub, Output, Proto, RealmCheck, Registration,
    VerifiedCredential,
};
use crate::proto::{
    actr_id_string, parse_actr_id, signaling_envelope, AIdCredential, ActrId, SignalingEnvelope,
};
use crate::stats::{self, SignalingStats};
use crate::store::{self, DbOp, Store, StoreError};
use crate::verify::{self, KeyCache};

/// Why the signaling routes could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    /// The configuration is invalid (one line per problem).
    #[error("invalid signaling configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The signaling database could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often expired database rows are purged.
const PURGE_EVERY: Duration = Duration::from_secs(300);
/// Frames written before a flush.
const WRITE_BATCH: usize = 64;

enum Out {
    /// A frame, with the arrival time of the frame that caused it (for the forward latency).
    Frame(Bytes, Option<Instant>),
    Close(u16, &'static str),
}

struct ConnHandle {
    tx: mpsc::Sender<Out>,
    kill: Arc<Notify>,
}

#[derive(Default)]
struct IpState {
    tokens: f64,
    last_ms: u64,
    open: u32,
}

struct RealmCache {
    store: RealmStore,
    ttl_ms: u64,
    map: HashMap<u32, (Result<(), String>, u64)>,
}

impl RealmCheck for RealmCache {
    fn check_realm(&mut self, now_unix_ms: u64, realm_id: u32) -> Result<(), String> {
        if let Some((r, at)) = self.map.get(&realm_id) {
            if now_unix_ms.saturating_sub(*at) < self.ttl_ms {
                return r.clone();
            }
        }
        let r = self
            .store
            .check(now_unix_ms / 1000, realm_id)
            .map_err(|e| e.to_string());
        if self.map.len() >= 65_536 {
            self.map.clear();
        }
        self.map.insert(realm_id, (r.clone(), now_unix_ms));
        r
    }
}

struct Core {
    hub: Hub,
    conns: HashMap<ConnId, ConnHandle>,
    realms: RealmCache,
    ips: HashMap<IpAddr, IpState>,
    open_total: u32,
}

struct Shared {
    /// Limits in force; replaced as a whole on reload (new connections and the next admission
    /// decisions use the new values, open connections keep the ones they started with).
    cfg: std::sync::RwLock<Arc<SignalingConfig>>,
    stats: Arc<SignalingStats>,
    core: Mutex<Core>,
    keys: Arc<KeyCache>,
    ais: Option<Arc<AisService>>,
    store: Store,
    clock: SharedClock,
    next_conn: AtomicU64,
    sweeper_started: AtomicBool,
    /// The queue to the cluster bridge, once [`Signaling::start_cluster`] ran.
    cluster: std::sync::OnceLock<crate::cluster::OutTx>,
    /// The node is shutting down ([`SignalingHandle::close_all`]): connections are told to go
    /// elsewhere, new ones at once.
    closing: AtomicBool,
}

impl Shared {
    fn cfg(&self) -> Arc<SignalingConfig> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_unix_ms(&self) -> u64 {
        self.clock.now_unix_ms()
    }
}

/// The signaling service: build it once, mount [`Signaling::router`], export
/// [`Signaling::stats`].
#[derive(Clone)]
pub struct Signaling {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling")
            .field("cfg", &self.shared.cfg())
            .finish_non_exhaustive()
    }
}

impl Signaling {
    /// Open `<data_dir>/signaling.db`, load the ACL and specs, and build the hub.
    pub fn new(
        ctx: &ControlContext,
        cfg: SignalingConfig,
        data_dir: &Path,
        stats: Arc<SignalingStats>,
    ) -> Result<Self, SignalingError> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(SignalingError::Config(problems));
        }
        let now_unix = ctx.clock.now_unix();
        let (store, loaded) = store::start(now_unix, data_dir, stats.clone(), cfg.spec_ttl_secs)?;
        let hub = Hub::new(
            cfg.clone(),
            stats.clone(),
            ctx.ais.is_some(),
            Box::new(|| uuid::Uuid::new_v4().to_string()),
            loaded,
        );
        let core = Core {
            hub,
            conns: HashMap::new(),
            realms: RealmCache {
                store: ctx.realms.clone(),
                ttl_ms: cfg.realm_cache_ms,
                map: HashMap::new(),
            },
            ips: HashMap::new(),
            open_total: 0,
        };
        Ok(Signaling {
            shared: Arc::new(Shared {
                cfg: std::sync::RwLock::new(Arc::new(cfg)),
                stats,
                core: Mutex::new(core),
                keys: KeyCache::new(ctx.keys.clone()),
                ais: ctx.ais.clone(),
                store,
                clock: ctx.clock.clone(),
                next_conn: AtomicU64::new(1),
                sweeper_started: AtomicBool::new(false),
                cluster: std::sync::OnceLock::new(),
                closing: AtomicBool::new(false),
            }),
        })
    }

    /// A handle to change the limits later (live reload).
    pub fn handle(&self) -> SignalingHandle {
        SignalingHandle {
            shared: self.shared.clone(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<SignalingStats> {
        self.shared.stats.clone()
    }

    /// `GET /signaling/ws` and `GET /signaling/health`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/signaling/ws", get(ws_handler))
            .route(
                "/signaling/health",
                get(|| async { "Signaling is healthy" }),
            )
            .with_state(self.shared.clone())
    }

    /// Join a cluster: publish this node's actors on the NATS bus and route to the actors of
    /// the other nodes (`crate::cluster`). `default_node_id` names the node when
    /// `cfg.node_id` is empty. Without this call nothing of the cluster exists.
    pub fn start_cluster(
        &self,
        mut cfg: crate::cluster::ClusterConfig,
        default_node_id: &str,
    ) -> Result<(), SignalingError> {
        if cfg.node_id.is_empty() {
            cfg.node_id = default_node_id.to_owned();
        }
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(SignalingError::Config(problems));
        }
        let (tx, rx) = mpsc::channel(cfg.queue_len);
        if self.shared.cluster.set(tx).is_err() {
            return Err(SignalingError::Config(vec![
                "cluster: already started".into()
            ]));
        }
        self.shared.lock().hub.enable_cluster();
        let weak = Arc::downgrade(&self.shared);
        let with_hub: crate::cluster::WithHub = Arc::new(move |f| {
            let Some(sh) = weak.upgrade() else { return };
            let now_unix_ms = sh.now_unix_ms();
            let mut core = sh.lock();
            f(&mut core.hub, now_unix_ms);
            drain(&sh, &mut core);
        });
        let node_id = cfg.node_id.clone();
        crate::cluster::spawn_bridge(
            cfg,
            node_id,
            rand::random(),
            self.shared.stats.clone(),
            with_hub,
            rx,
        )
        .map_err(|e| SignalingError::Config(vec![format!("cluster: cannot start: {e}")]))
    }

    /// Wait until every queued database write is committed. Blocking; for tests and shutdown.
    pub fn flush_blocking(&self) {
        self.shared.store.flush_blocking();
    }
}

/// Build the signaling routes for `ControlBuilder::routes_with`.
pub fn router(
    ctx: &ControlContext,
    cfg: SignalingConfig,
    data_dir: &Path,
) -> Result<Router, SignalingError> {
    router_with_stats(ctx, cfg, data_dir, Arc::new(SignalingStats::default()))
}

/// Like [`router`], with counters the caller keeps (to export them on `/metrics`).
pub fn router_with_stats(
    ctx: &ControlContext,
    cfg: SignalingConfig,
    data_dir: &Path,
    stats: Arc<SignalingStats>,
) -> Result<Router, SignalingError> {
    Ok(Signaling::new(ctx, cfg, data_dir, stats)?.router())
}

// ----- output dispatch -----

/// Drain the hub's outputs. Called with the lock held after every `handle_*`.
fn drain(shared: &Arc<Shared>, core: &mut Core) {
    drain_caused_by(shared, core, None)
}

/// [`drain`] for the outputs of a frame that arrived at `arrived`: their frames carry it, and
/// the writer records the forward latency once they are written.
fn drain_caused_by(shared: &Arc<Shared>, core: &mut Core, arrived: Option<Instant>) {
    while let Some(o) = core.hub.poll_output() {
        match o {
            Output::Send { conn, envelope } => {
                let bytes = match core.hub.proto(conn) {
                    Proto::V1 => envelope.encode_to_vec(),
                    Proto::V4 => match crate::v4::encode(&envelope) {
                        Some(b) => b,
                        None => continue,
                    },
                };
                push(shared, core, conn, Out::Frame(Bytes::from(bytes), arrived));
            }
            Output::Close { conn, code, reason } => {
                push(shared, core, conn, Out::Close(code, reason))
            }
            Output::Persist(op) => shared.store.submit(DbOp::Persist(Box::new(op))),
            Output::Ais(call) => spawn_ais(shared.clone(), call),
            Output::Cluster(o) => {
                let sent = shared
                    .cluster
                    .get()
                    .is_some_and(|tx| tx.try_send(o).is_ok());
                if !sent {
                    stats::inc(&shared.stats.cluster_dropped);
                }
            }
            Output::Restore(pending) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                shared.store.submit(DbOp::Lookup {
                    key: crate::hub::ActorKey::of(&pending.source),
                    now_unix: shared.now_unix_ms() / 1000,
                    reply: tx,
                });
                let sh = shared.clone();
                tokio::spawn(async move {
                    let row = rx.await.ok().flatten();
                    let now_unix_ms = sh.now_unix_ms();
                    let mut core = sh.lock();
                    core.hub.handle_restored(now_unix_ms, pending, row);
                    drain(&sh, &mut core);
                });
            }
        }
    }
}

fn push(shared: &Shared, core: &mut Core, conn: ConnId, out: Out) {
    let Some(h) = core.conns.get(&conn) else {
        return;
    };
    let is_frame = matches!(out, Out::Frame(..));
    match h.tx.try_send(out) {
        Ok(()) => {
            if is_frame {
                stats::inc(&shared.stats.envelopes_out);
            }
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            // A client that stops reading is cut off; nobody else waits for it.
            stats::inc(&shared.stats.slow_consumer_drops);
            h.kill.notify_one();
            core.conns.remove(&conn);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            core.conns.remove(&conn);
        }
    }
}

fn spawn_ais(shared: Arc<Shared>, call: AisCall) {
    let Some(ais) = shared.ais.clone() else {
        return;
    };
    tokio::spawn(async move {
        match call {
            AisCall::Register {
                conn,
                reply_for,
                request,
            } => {
                let body = verify::ais_register_body(&request.actr_type, &request.realm);
                let res = tokio::task::spawn_blocking(move || ais.register(&body)).await;
                let result = match res {
                    Ok(resp) => match resp.result {
                        Some(crate::proto::register_response::Result::Success(ok)) => Ok(ok),
                        Some(crate::proto::register_response::Result::Error(e)) => {
                            Err(format!("{} {}", e.code, e.message))
                        }
                        None => Err("empty response".to_owned()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                let now_unix_ms = shared.now_unix_ms();
                let mut core = shared.lock();
                core.hub
                    .handle_register_result(now_unix_ms, conn, reply_for, request, result);
                drain(&shared, &mut core);
            }
            AisCall::Refresh {
                conn,
                reply_for,
                source,
            } => {
                let keys = shared.keys.clone();
                let now_unix = shared.now_unix_ms() / 1000;
                let src = source.clone();
                let res = tokio::task::spawn_blocking(move || {
                    verify::reissue_blocking(now_unix, &ais, &keys, &src)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                let now_unix_ms = shared.now_unix_ms();
                let mut core = shared.lock();
                core.hub
                    .handle_refresh_result(now_unix_ms, conn, reply_for, source, res);
                drain(&shared, &mut core);
            }
        }
    });
}

// ----- admission -----

enum Refusal {
    Rate,
    Concurrency,
}

/// Releases the per-IP and total connection slots when the connection ends (or the upgrade
/// never happens).
struct Admission {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        core.open_total = core.open_total.saturating_sub(1);
        if let Some(s) = core.ips.get_mut(&self.ip) {
            s.open = s.open.saturating_sub(1);
        }
    }
}

fn admit(now_unix_ms: u64, shared: &Arc<Shared>, ip: IpAddr) -> Result<Admission, Refusal> {
    let cfg = shared.cfg();
    let mut core = shared.lock();
    if core.open_total >= cfg.max_conns {
        return Err(Refusal::Concurrency);
    }
    if core.ips.len() >= 100_000 && !core.ips.contains_key(&ip) {
        // Forget idle addresses whose bucket has refilled; bounded memory under a scan.
        let burst = f64::from(cfg.conn_burst);
        let rate = f64::from(cfg.conn_rate_per_sec);
        core.ips.retain(|_, s| {
            s.open > 0
                || s.tokens + (now_unix_ms.saturating_sub(s.last_ms) as f64 / 1000.0) * rate < burst
        });
    }
    let st = core.ips.entry(ip).or_insert_with(|| IpState {
        tokens: f64::from(cfg.conn_burst),
        last_ms: now_unix_ms,
        open: 0,
    });
    if st.open >= cfg.max_conns_per_ip {
        return Err(Refusal::Concurrency);
    }
    let elapsed = now_unix_ms.saturating_sub(st.last_ms) as f64 / 1000.0;
    st.tokens =
        (st.tokens + elapsed * f64::from(cfg.conn_rate_per_sec)).min(f64::from(cfg.conn_burst));
    st.last_ms = now_unix_ms;
    if st.tokens < 1.0 {
        return Err(Refusal::Rate);
    }
    st.tokens -= 1.0;
    st.open += 1;
    core.open_total += 1;
    drop(core);
    Ok(Admission {
        shared: shared.clone(),
        ip,
    })
}

// ----- the WebSocket endpoint -----

#[derive(Default)]
struct UrlIdentity {
    actor_id: Option<String>,
    /// 0.1.7: `token` (base64 of `encrypted_token`) and `token_key_id`.
    token: Option<String>,
    token_key_id: u32,
    /// 0.4: `key_id`, `claims` and `signature` (base64).
    key_id: u32,
    claims: Option<String>,
    signature: Option<String>,
    wants_answer: bool,
}

impl UrlIdentity {
    /// The protocol the connection speaks: 0.4 when the URL carries 0.4 credential
    /// parameters, 0.1.7 otherwise (control/WIRE-0.4.md).
    fn proto(&self) -> Proto {
        if self.claims.is_some() || self.signature.is_some() {
            Proto::V4
        } else {
            Proto::V1
        }
    }
}

/// Form decoding turns '+' into ' '; standard base64 has no spaces, so undo it.
fn b64(v: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(v.trim().replace(' ', "+"))
        .ok()
}

fn parse_query(q: Option<&str>) -> UrlIdentity {
    let mut u = UrlIdentity::default();
    let Some(q) = q else { return u };
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        match &*k {
            "actor_id" => u.actor_id = Some(v.into_owned()),
            "token" => u.token = Some(v.into_owned()),
            "token_key_id" => u.token_key_id = v.trim().parse().unwrap_or(0),
            "key_id" => u.key_id = v.trim().parse().unwrap_or(0),
            "claims" => u.claims = Some(v.into_owned()),
            "signature" => u.signature = Some(v.into_owned()),
            "webrtc_role" => u.wants_answer = v.eq_ignore_ascii_case("answer"),
            _ => {}
        }
    }
    u
}

/// Wire section 9.2: the URL identity is bound only if its token decrypts, is unexpired, is for
/// the same realm and names exactly `actor_id`, and the realm is valid.
async fn validate_url_identity(
    shared: &Arc<Shared>,
    u: &UrlIdentity,
) -> Option<(ActrId, AIdCredential, Arc<VerifiedCredential>)> {
    let actor_id = u.actor_id.as_deref()?;
    let token = u.token.as_deref()?;
    let id = parse_actr_id(actor_id)?;
    // Form decoding turns '+' into ' '; standard base64 has no spaces, so undo it.
    let token = base64::engine::general_purpose::STANDARD
        .decode(token.trim().replace(' ', "+"))
        .ok()?;
    let cred = AIdCredential {
        encrypted_token: token,
        token_key_id: u.token_key_id,
    };
    let keys = shared.keys.clone();
    let now_unix_ms = shared.now_unix_ms();
    let c2 = cred.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        verify::verify_blocking(now_unix_ms / 1000, &keys, &c2)
    })
    .await
    .ok()?;
    let CredentialVerdict::Valid(v) = verdict else {
        return None;
    };
    if now_unix_ms / 1000 > v.expr_time
        || v.realm_id != id.realm.realm_id
        || v.actor_id != actor_id
        || v.actor_id != actr_id_string(&id)
    {
        return None;
    }
    let mut core = shared.lock();
    core.realms
        .check_realm(now_unix_ms, id.realm.realm_id)
        .ok()?;
    Some((id, cred, v))
}

/// The 0.4 form of wire section 9.2: the URL identity is bound only if its claims carry a
/// valid Ed25519 signature of an AIS signing key, are unexpired, are for the same realm and
/// name exactly `actor_id`, and the realm is valid. Never blocks.
fn validate_url_identity_v4(
    shared: &Arc<Shared>,
    u: &UrlIdentity,
) -> Option<(ActrId, Vec<u8>, Arc<VerifiedCredential>)> {
    let actor_id = u.actor_id.as_deref()?;
    let id = parse_actr_id(actor_id)?;
    let cred = actrix_wire::v4::actr::AIdCredential {
        key_id: u.key_id,
        claims: b64(u.claims.as_deref()?)?,
        signature: b64(u.signature.as_deref()?)?,
    };
    let now_unix_ms = shared.now_unix_ms();
    let CredentialVerdict::Valid(v) =
        verify::verify_v4(now_unix_ms / 1000, shared.ais.as_deref(), &cred)
    else {
        return None;
    };
    if now_unix_ms / 1000 > v.expr_time
        || v.realm_id != id.realm.realm_id
        || v.actor_id != actor_id
        || v.actor_id != actr_id_string(&id)
    {
        return None;
    }
    let mut core = shared.lock();
    core.realms
        .check_realm(now_unix_ms, id.realm.realm_id)
        .ok()?;
    Some((id, cred.encode_to_vec(), v))
}

/// Whether a browser's `Origin` may open the WebSocket: absent (not a browser), the node's
/// own origin (its host and port equal the request's `Host`), or listed in
/// `signaling.allowed_origins` (exact, case-insensitive; `"*"` allows any).
fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()))
}

#[cfg(test)]
mod origin_tests {
    use super::origin_allowed;

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(None, Some("a:1"), &none));
        assert!(origin_allowed(Some("http://a:1"), Some("a:1"), &none));
        assert!(origin_allowed(Some("https://A:1/"), Some("a:1"), &none));
        assert!(!origin_allowed(Some("http://b:1"), Some("a:1"), &none));
        assert!(!origin_allowed(Some("http://a:1"), None, &none));
        assert!(!origin_allowed(Some("null"), Some("a:1"), &none));
        let list = vec!["https://app.example".to_string()];
        assert!(origin_allowed(
            Some("https://app.example"),
            Some("a:1"),
            &list
        ));
        assert!(!origin_allowed(
            Some("http://app.example"),
            Some("a:1"),
            &list
        ));
        assert!(origin_allowed(Some("null"), None, &["*".to_string()]));
    }
}

async fn ws_handler(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let header = |n: axum::http::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if !origin_allowed(
        header(axum::http::header::ORIGIN),
        header(axum::http::header::HOST),
        &shared.cfg().allowed_origins,
    ) {
        stats::inc(&shared.stats.connections_rejected_origin);
        return (StatusCode::FORBIDDEN, "Origin not allowed").into_response();
    }
    ensure_sweeper(&shared);

    let now_unix_ms = shared.now_unix_ms();
    let admission = match admit(now_unix_ms, &shared, peer.ip().to_canonical()) {
        Ok(a) => a,
        Err(r) => {
            match r {
                Refusal::Rate => stats::inc(&shared.stats.connections_rejected_rate),
                Refusal::Concurrency => stats::inc(&shared.stats.connections_rejected_concurrency),
            }
            return (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests").into_response();
        }
    };
    let url = parse_query(query.as_deref());
    let proto = url.proto();
    let mut identity = None;
    let mut registration = None;
    let mut creds = CredCache::default();
    if url.actor_id.is_some() || url.token.is_some() || proto == Proto::V4 {
        let validated = match proto {
            Proto::V1 => validate_url_identity(&shared, &url)
                .await
                .map(|(id, cred, v)| (id, cred.encode_to_vec(), v)),
            Proto::V4 => validate_url_identity_v4(&shared, &url),
        };
        match validated {
            Some((id, cred, v)) => {
                creds.insert(cred, v, shared.cfg().credential_cache_per_conn);
                if proto == Proto::V4 {
                    registration = shared
                        .ais
                        .as_ref()
                        .and_then(|a| a.take_pending_v4(id.realm.realm_id, id.serial_number))
                        .map(|r| crate::v4::registration(id.realm.realm_id, r));
                }
                identity = Some(id);
            }
            None => {
                stats::inc(&shared.stats.url_identity_refused);
                tracing::info!(peer = %peer, "signaling: URL identity refused; connection stays unbound");
            }
        }
    }
    let cfg = shared.cfg();
    let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let wants_answer = url.wants_answer;
    let sh = shared.clone();
    ws.read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_message_size(cfg.max_message_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        .on_upgrade(move |socket| async move {
            let start = Start {
                identity,
                wants_answer,
                proto,
                registration,
            };
            run_conn(sh, socket, conn, start, creds, admission).await;
        })
}

/// Credentials this connection already presented and that verified, compared byte for byte
/// (their encoded form, of the connection's protocol), so a busy connection costs one ECIES
/// decryption or Ed25519 verification, not one per envelope.
#[derive(Default)]
struct CredCache {
    entries: Vec<(Vec<u8>, Arc<VerifiedCredential>)>,
}

impl CredCache {
    fn get(&self, c: &[u8]) -> Option<Arc<VerifiedCredential>> {
        self.entries
            .iter()
            .find(|(k, _)| k[..] == c[..])
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, c: Vec<u8>, v: Arc<VerifiedCredential>, cap: usize) {
        if self.entries.len() >= cap.max(1) {
            self.entries.remove(0);
        }
        self.entries.push((c, v));
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn credential_of(env: &SignalingEnvelope) -> Option<&AIdCredential> {
    match &env.flow {
        Some(signaling_envelope::Flow::ActrToServer(a)) => Some(&a.credential),
        Some(signaling_envelope::Flow::ActrRelay(r)) => Some(&r.credential),
        _ => None,
    }
}

/// The close code a read error calls for (RFC 6455 §7.4.1), if the connection can still say
/// one: 1009 for a message or frame over the limit, 1002 for a protocol violation (unmasked
/// client frame, reserved bits or opcodes, bad control frame, bad close payload...), 1007 for
/// text that is not UTF-8. I/O errors and a connection already closed get nothing: there is
/// nobody to tell.
fn close_code_for(e: axum::Error) -> Option<(u16, &'static str)> {
    match e.into_inner().downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some((1009, "message too big")),
        tungstenite::Error::Protocol(_) => Some((1002, "protocol error")),
        tungstenite::Error::Utf8(_) => Some((1007, "invalid utf-8")),
        _ => None,
    }
}

/// How a connection starts: its URL identity (validated), role wish and protocol, and for a
/// 0.4 actor what it registered with.
struct Start {
    identity: Option<ActrId>,
    wants_answer: bool,
    proto: Proto,
    registration: Option<Registration>,
}

/// A frame decoded for the hub, with the verdict on its credential; or nothing more to do.
enum Decoded {
    Hub(Box<SignalingEnvelope>, Option<CredentialVerdict>),
    Done,
}

async fn run_conn(
    shared: Arc<Shared>,
    socket: WebSocket,
    conn: ConnId,
    start: Start,
    mut creds: CredCache,
    admission: Admission,
) {
    let Start {
        identity,
        wants_answer,
        proto,
        registration,
    } = start;
    let cfg = shared.cfg();
    stats::inc(&shared.stats.connections_open);
    if proto == Proto::V4 {
        stats::inc(&shared.stats.connections_v4);
    }
    stats::inc(&shared.stats.connections_total);
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Out>(cfg.send_queue_len);
    let kill = Arc::new(Notify::new());
    let local_tx = tx.clone();
    {
        let now_unix_ms = shared.now_unix_ms();
        let mut core = shared.lock();
        core.conns.insert(
            conn,
            ConnHandle {
                tx,
                kill: kill.clone(),
            },
        );
        match proto {
            Proto::V1 => core
                .hub
                .handle_connect(now_unix_ms, conn, identity, wants_answer),
            Proto::V4 => {
                core.hub
                    .handle_connect_v4(now_unix_ms, conn, identity, wants_answer, registration)
            }
        }
        drain(&shared, &mut core);
        // Checked under the lock `close_all` takes after setting the flag: a connection is
        // either in the table it walks or sees the flag here.
        if shared.closing.load(Ordering::Acquire) {
            let _ = local_tx.try_send(Out::Close(GOING_AWAY.0, GOING_AWAY.1));
        }
    }
    let mut writer = tokio::spawn(write_loop(
        sink,
        rx,
        Duration::from_secs(cfg.ping_interval_secs),
        shared.stats.clone(),
    ));
    let mut bucket = Bucket {
        tokens: f64::from(cfg.msg_burst),
        last: Instant::now(),
        rate: f64::from(cfg.msg_rate_per_sec),
        burst: f64::from(cfg.msg_burst),
    };
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let mut last_activity = Instant::now();
    let mut idle_timer = pin!(tokio::time::sleep(idle));
    let mut auth_timer = pin!(tokio::time::sleep(Duration::from_secs(
        cfg.auth_timeout_secs
    )));
    let mut auth_armed = true;
    let mut closing = false;
    let close = |code: u16, reason: &'static str| {
        let _ = local_tx.try_send(Out::Close(code, reason));
    };
    let mut writer_done = false;
    loop {
        tokio::select! {
            _ = kill.notified() => break,
            _ = &mut writer => { writer_done = true; break }
            _ = &mut idle_timer => {
                let deadline = last_activity + idle;
                if Instant::now() < deadline {
                    idle_timer.as_mut().reset(deadline);
                } else if closing {
                    break;
                } else {
                    stats::inc(&shared.stats.timeout_closes);
                    close(1001, "idle timeout");
                    closing = true;
                    idle_timer.as_mut().reset(Instant::now() + Duration::from_secs(2));
                }
            }
            _ = &mut auth_timer, if auth_armed => {
                auth_armed = false;
                let bound = shared.lock().hub.bound(conn).is_some();
                if !bound {
                    stats::inc(&shared.stats.timeout_closes);
                    close(1008, "authentication timeout");
                    closing = true;
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { break };
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => {
                        if let Some((code, reason)) = close_code_for(e) {
                            if code == 1009 {
                                stats::inc(&shared.stats.oversize_closes);
                            } else {
                                stats::inc(&shared.stats.protocol_closes);
                            }
                            close(code, reason);
                            // Let the writer send the close frame, then stop.
                            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
                            writer_done = true;
                        }
                        break;
                    }
                };
                last_activity = Instant::now();
                if closing {
                    continue;
                }
                let data = match frame {
                    Message::Binary(b) => b,
                    Message::Close(_) => {
                        // The WebSocket layer has queued the reply that echoes the client's
                        // code (RFC 6455 §5.5.1); the writer's close flushes it. Then stop.
                        if !closing {
                            close(1000, "");
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
                        writer_done = true;
                        break;
                    }
                    // Text frames are ignored (wire section 8.1); pings are answered by the
                    // WebSocket layer.
                    _ => continue,
                };
                stats::inc(&shared.stats.frames_in);
                // Wire section 8.1, per frame in order: (1) rate limit, (2) decode, (3) dispatch.
                if !bucket.take(last_activity) {
                    let now_unix_ms = shared.now_unix_ms();
                    let mut core = shared.lock();
                    core.hub.envelope_error(
                        now_unix_ms,
                        conn,
                        429,
                        format!("Too many messages. Limit: {} messages/second", cfg.msg_rate_per_sec),
                    );
                    drain(&shared, &mut core);
                    continue;
                }
                let decoded = match proto {
                    Proto::V1 => decode_v1(&shared, conn, &data, &mut creds).await,
                    Proto::V4 => decode_v4(&shared, conn, &data, &mut creds, &local_tx),
                };
                let (env, verdict) = match decoded {
                    Ok(Decoded::Hub(env, verdict)) => (*env, verdict),
                    Ok(Decoded::Done) => continue,
                    Err(e) => {
                        // Actrix closes the connection on an undecodable frame; we first say
                        // why with an envelope_error, then close with 1007 (invalid data).
                        stats::inc(&shared.stats.decode_errors);
                        let now_unix_ms = shared.now_unix_ms();
                        {
                            let mut core = shared.lock();
                            core.hub.envelope_error(now_unix_ms, conn, 400, format!("Malformed envelope: {e}"));
                            drain(&shared, &mut core);
                        }
                        close(1007, "malformed envelope");
                        closing = true;
                        continue;
                    }
                };
                let now_unix_ms = shared.now_unix_ms();
                let mut core = shared.lock();
                let Core { hub, realms, .. } = &mut *core;
                hub.handle_envelope(now_unix_ms, conn, env, verdict, realms);
                drain_caused_by(&shared, &mut core, Some(last_activity));

            }
        }
    }
    {
        let now_unix_ms = shared.now_unix_ms();
        let mut core = shared.lock();
        core.conns.remove(&conn);
        core.hub.handle_disconnect(now_unix_ms, conn);
        drain(&shared, &mut core);
    }
    drop(local_tx);
    if !writer_done {
        // Give a queued close frame a moment, then drop the socket.
        if tokio::time::timeout(Duration::from_millis(500), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
    stats::dec(&shared.stats.connections_open);
    if proto == Proto::V4 {
        stats::dec(&shared.stats.connections_v4);
    }
    drop(admission);
}

/// Refuse a well-formed envelope of the other protocol: 401 to its source, nothing relayed,
/// the connection stays open (control/WIRE-0.4.md).
fn refuse_other_protocol(
    shared: &Arc<Shared>,
    conn: ConnId,
    (source, envelope_id): (ActrId, String),
    message: &str,
) {
    stats::inc(&shared.stats.wrong_protocol);
    let now_unix_ms = shared.now_unix_ms();
    let mut core = shared.lock();
    core.hub.refuse(
        now_unix_ms,
        conn,
        &envelope_id,
        source,
        401,
        format!("Credential validation failed: {message}"),
    );
    drain(shared, &mut core);
}

/// A frame of a 0.1.7 connection.
async fn decode_v1(
    shared: &Arc<Shared>,
    conn: ConnId,
    data: &[u8],
    creds: &mut CredCache,
) -> Result<Decoded, prost::DecodeError> {
    let env = match SignalingEnvelope::decode(data) {
        Ok(env) => env,
        Err(e) => {
            return match crate::v4::other_protocol_v4(data) {
                Some(who) => {
                    refuse_other_protocol(
                        shared,
                        conn,
                        who,
                        "an actr 0.4 credential on an actr 0.1.7 connection",
                    );
                    Ok(Decoded::Done)
                }
                None => Err(e),
            }
        }
    };
    let verdict = match credential_of(&env) {
        None => None,
        Some(c) => {
            let key = c.encode_to_vec();
            match creds.get(&key) {
                Some(v) => Some(CredentialVerdict::Valid(v)),
                None => {
                    let keys = shared.keys.clone();
                    let c2 = c.clone();
                    let now_unix = shared.now_unix_ms() / 1000;
                    let verdict = tokio::task::spawn_blocking(move || {
                        verify::verify_blocking(now_unix, &keys, &c2)
                    })
                    .await
                    .unwrap_or_else(|e| CredentialVerdict::Invalid(e.to_string()));
                    if let CredentialVerdict::Valid(v) = &verdict {
                        creds.insert(key, v.clone(), shared.cfg().credential_cache_per_conn);
                    }
                    Some(verdict)
                }
            }
        }
    };
    Ok(Decoded::Hub(Box::new(env), verdict))
}

/// The verdict on a 0.4 credential (Ed25519: cheap enough to run inline).
fn verdict_v4(
    shared: &Arc<Shared>,
    creds: &mut CredCache,
    c: &actrix_wire::v4::actr::AIdCredential,
) -> CredentialVerdict {
    let key = c.encode_to_vec();
    if let Some(v) = creds.get(&key) {
        return CredentialVerdict::Valid(v);
    }
    let verdict = verify::verify_v4(shared.now_unix_ms() / 1000, shared.ais.as_deref(), c);
    if let CredentialVerdict::Valid(v) = &verdict {
        creds.insert(key, v.clone(), shared.cfg().credential_cache_per_conn);
    }
    verdict
}

/// A frame of a 0.4 connection: translated for the hub, or answered here (signing keys,
/// refused registrations, credentials of the other protocol).
fn decode_v4(
    shared: &Arc<Shared>,
    conn: ConnId,
    data: &[u8],
    creds: &mut CredCache,
    out: &mpsc::Sender<Out>,
) -> Result<Decoded, prost::DecodeError> {
    use actrix_wire::v4::{actr as a4, signaling as s4};
    let incoming = match crate::v4::decode(data) {
        Ok(i) => i,
        Err(e) => {
            return match crate::v4::other_protocol_v1(data) {
                Some(who) => {
                    refuse_other_protocol(
                        shared,
                        conn,
                        who,
                        "an actr 0.1.7 credential on an actr 0.4 connection",
                    );
                    Ok(Decoded::Done)
                }
                None => Err(e),
            }
        }
    };
    match incoming {
        crate::v4::Incoming::Envelope(env, cred) => {
            let verdict = cred.map(|c| verdict_v4(shared, creds, &c));
            Ok(Decoded::Hub(env, verdict))
        }
        crate::v4::Incoming::Register { envelope_id } => {
            let frame = crate::v4::reply(
                shared.now_unix_ms(),
                uuid::Uuid::new_v4().to_string(),
                envelope_id,
                crate::v4::recode(&crate::hub::placeholder_id()),
                s4::signaling_to_actr::Payload::RegisterResponse(a4::RegisterResponse {
                    result: Some(a4::register_response::Result::Error(a4::ErrorResponse {
                        code: 400,
                        message: "actr 0.4 clients register with POST /ais/register".into(),
                    })),
                }),
            );
            shared.stats.count_error(400);
            let _ = out.try_send(Out::Frame(Bytes::from(frame), None));
            Ok(Decoded::Done)
        }
        crate::v4::Incoming::SigningKey {
            envelope_id,
            source,
            credential,
            key_id,
        } => {
            let verdict = verdict_v4(shared, creds, &credential);
            let now_unix_ms = shared.now_unix_ms();
            let allowed = {
                let mut core = shared.lock();
                let Core { hub, realms, .. } = &mut *core;
                let ok = hub.authenticate_request(
                    now_unix_ms,
                    conn,
                    &envelope_id,
                    &source,
                    Some(verdict),
                    realms,
                );
                drain(shared, &mut core);
                ok
            };
            if !allowed {
                return Ok(Decoded::Done);
            }
            let key = shared
                .ais
                .as_ref()
                .and_then(|a| a.signing_keys())
                .and_then(|k| k.key(now_unix_ms / 1000, key_id));
            let payload = match key {
                Some(k) => s4::signaling_to_actr::Payload::GetSigningKeyResponse(
                    s4::GetSigningKeyResponse {
                        key_id,
                        pubkey: k.verifying_key.to_vec(),
                    },
                ),
                None => {
                    shared.stats.count_error(404);
                    s4::signaling_to_actr::Payload::Error(a4::ErrorResponse {
                        code: 404,
                        message: format!("signing key not found: key_id={key_id}"),
                    })
                }
            };
            let frame = crate::v4::reply(
                now_unix_ms,
                uuid::Uuid::new_v4().to_string(),
                envelope_id,
                crate::v4::recode(&source),
                payload,
            );
            if out.try_send(Out::Frame(Bytes::from(frame), None)).is_ok() {
                stats::inc(&shared.stats.envelopes_out);
            }
            Ok(Decoded::Done)
        }
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Out>,
    ping_every: Duration,
    stats: Arc<SignalingStats>,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Arrival times of the frames in the batch being written (at most WRITE_BATCH; it grows
    // only as far as a connection's batches do).
    let mut arrivals: Vec<Instant> = Vec::new();
    loop {
        tokio::select! {
            biased;
            m = rx.recv() => {
                let Some(m) = m else { break };
                let mut close = None;
                match m {
                    Out::Frame(b, arrived) => {
                        arrivals.clear();
                        arrivals.extend(arrived);
                        if sink.feed(Message::Binary(b)).await.is_err() {
                            return;
                        }
                        for _ in 1..WRITE_BATCH {
                            match rx.try_recv() {
                                Ok(Out::Frame(b, arrived)) => {
                                    arrivals.extend(arrived);
                                    if sink.feed(Message::Binary(b)).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(Out::Close(c, r)) => {
                                    close = Some((c, r));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                        if !arrivals.is_empty() {
                            let now = Instant::now();
                            for a in &arrivals {
                                stats.forward_latency.record(now.saturating_duration_since(*a));
                            }
                        }

                    }
                    Out::Close(c, r) => close = Some((c, r)),
                }
                if let Some((code, reason)) = close {
                    let sent = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    if sent.is_err() {
                        // The client closed first: the WebSocket layer refuses a close of our
                        // own and holds the reply that echoes the client's (RFC 6455 §5.5.1);
                        // a flush sends it.
                        let _ = sink.flush().await;
                    }
                    return;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn ensure_sweeper(shared: &Arc<Shared>) {
    if shared.sweeper_started.swap(true, Ordering::AcqRel) {
        return;
    }
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let every = Duration::from_secs(shared.cfg().sweep_interval_secs);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = Instant::now();
        loop {
            tick.tick().await;
            let Some(sh) = weak.upgrade() else { return };
            let now_unix_ms = sh.now_unix_ms();
            {
                let mut core = sh.lock();
                core.hub.handle_timeout(now_unix_ms);
                drain(&sh, &mut core);
            }
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = Instant::now();
                let now_unix = now_unix_ms / 1000;
                sh.store.submit(DbOp::Purge {
                    now_unix,
                    spec_cutoff: now_unix.saturating_sub(sh.cfg().spec_ttl_secs),
                });
            }
        }
    });
}

/// Changes the hub's limits at run time: connection and message rates, sizes, queue length,
/// timeouts of new connections. Registry timers (heartbeat, TTLs) keep their start values.
#[derive(Clone)]
pub struct SignalingHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SignalingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalingHandle").finish_non_exhaustive()
    }
}

/// The close a draining node sends (RFC 6455 §7.4.1, 1001 Going Away: the server is going
/// down; the client reconnects, and the load balancer sends it to another node).
pub const GOING_AWAY: (u16, &str) = (1001, "server going away: reconnect");

impl SignalingHandle {
    /// Shutdown drain: close every connection with [`GOING_AWAY`] (a connection whose send
    /// queue is full is cut), and new ones as soon as they open. Returns how many were open.
    pub fn close_all(&self) -> usize {
        self.shared.closing.store(true, Ordering::Release);
        let core = self.shared.lock();
        for h in core.conns.values() {
            if h.tx
                .try_send(Out::Close(GOING_AWAY.0, GOING_AWAY.1))
                .is_err()
            {
                h.kill.notify_one();
            }
        }
        core.conns.len()
    }

    /// Validate and apply `cfg`; every problem is returned and nothing changes on error.
    pub fn update(&self, cfg: SignalingConfig) -> Result<(), Vec<String>> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        *self.shared.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
        Ok(())
    }

    /// The limits in force.
    pub fn current(&self) -> SignalingConfig {
        (*self.shared.cfg()).clone()
    }
}
