//! The control thread: one OS thread, one current-thread tokio runtime, one HTTP server.
//!
//! Everything that can fail because of configuration or the environment (bad config, wrong KEK,
//! address in use, unreadable certificate) happens in [`ControlBuilder::spawn`] on the caller's
//! thread, so it is returned rather than logged from inside the thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};
use tower_http::cors::CorsLayer;

use crate::ais::{self, AisService};
use crate::clock::{system_clock, SharedClock};
use crate::config::{ControlConfig, AIS_SIGNING_DB_FILE, CONTROL_DB_FILE, KS_DB_FILE};
use crate::error::ControlError;
use crate::identity::{self, IdentityError, IdentityVerifier, Readiness};
use crate::ks::client::KsClient;
use crate::ks::store::{KeyId, KeyStore, SecretRecord};
use crate::ks::{self, KeySource, KeySourceError, KsService};
use crate::nonce_auth::{NonceAuthenticator, NonceStore};
use crate::realms::RealmStore;
use actrix_proto::auth::{IdentityAnswer, IdentityRequest};

/// Capacity of the data plane → control thread identity channel.
pub const IDENTITY_QUEUE: usize = 4096;
/// Most identity queries parked while their key is fetched from a remote KS.
const MAX_PENDING_QUERIES: usize = 4096;
/// How long a graceful shutdown waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The default of `http.header_read_timeout_secs`: a request header (including a WebSocket
/// upgrade request) must arrive complete within this time; a client that sends part of one and
/// stalls is disconnected (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What route factories can use to build routes that talk to the control plane in-process
/// (for example signaling calling the AIS without going through HTTP and its rate limit).
#[derive(Clone, Debug)]
pub struct ControlContext {
    /// The AIS, when enabled. [`AisService::register`] is blocking: call it from
    /// `spawn_blocking`.
    pub ais: Option<Arc<AisService>>,
    /// Where keys come from (local store or remote KS). Blocking.
    pub keys: KeySource,
    /// The realms table.
    pub realms: RealmStore,
    /// The nonce-auth verifier over the shared key (context strings keep callers apart).
    pub auth: NonceAuthenticator,
    /// The clock everything uses.
    pub clock: SharedClock,
}

type RouteFactory = Box<dyn FnOnce(&ControlContext) -> Router + Send>;

/// Builder for the control thread.
pub struct ControlBuilder {
    config: ControlConfig,
    pin_core: Option<usize>,
    extra: Router,
    factories: Vec<RouteFactory>,
    clock: SharedClock,
    http_stats: Option<Arc<crate::http_stats::HttpStats>>,
    identity_stats: Option<Arc<crate::identity::IdentityStats>>,
    identity: Option<IdentityChannels>,
    max_connections: Option<usize>,
}

/// The control thread's side of the identity exchange with the data plane: requests from
/// every shard on one channel, answers to each shard on its own (indexed by `ShardId`).
struct IdentityChannels {
    requests: mpsc::Receiver<IdentityRequest>,
    answers: Vec<crossbeam_channel::Sender<IdentityAnswer>>,
}

impl std::fmt::Debug for ControlBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlBuilder")
            .field("config", &self.config)
            .field("pin_core", &self.pin_core)
            .finish_non_exhaustive()
    }
}

impl ControlBuilder {
    /// Start from a configuration whose secrets were resolved
    /// ([`ControlConfig::resolve_secrets`]).
    pub fn new(config: ControlConfig) -> Self {
        ControlBuilder {
            config,
            pin_core: None,
            extra: Router::new(),
            http_stats: None,
            identity_stats: None,
            identity: None,
            factories: Vec::new(),
            clock: system_clock(),
            max_connections: None,
        }
    }

    /// Admit at most `n` connections at once, below `http.max_connections` when that is
    /// higher: the descriptor budget the process leaves the control plane after reserving the
    /// data plane's (see the appliance's README, "Descriptors"). The per-IP cap is lowered to
    /// it as well.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// Pin the control thread to this core id.
    pub fn pin_core(mut self, core: Option<usize>) -> Self {
        self.pin_core = core;
        self
    }

    /// Merge extra routes (signaling, `/metrics`, ...) into the same server.
    /// Record request counts and latencies by route and status into `stats`.
    pub fn http_stats(mut self, stats: Arc<crate::http_stats::HttpStats>) -> Self {
        self.http_stats = Some(stats);
        self
    }

    /// Serve TURN identity lookups: `requests` from the data plane (bounded, created with
    /// [`IDENTITY_QUEUE`]), each answered on `answers[request.shard]`. Without this, no
    /// identity lookups are served.
    pub fn identity(
        mut self,
        requests: mpsc::Receiver<IdentityRequest>,
        answers: Vec<crossbeam_channel::Sender<IdentityAnswer>>,
    ) -> Self {
        self.identity = Some(IdentityChannels { requests, answers });
        self
    }

    /// Count TURN identity resolutions, decryptions and key fetches into `stats`.
    pub fn identity_stats(mut self, stats: Arc<crate::identity::IdentityStats>) -> Self {
        self.identity_stats = Some(stats);
        self
    }

    pub fn routes(mut self, extra: Router) -> Self {
        self.extra = self.extra.merge(extra);
        self
    }

    /// Merge routes built from the running control plane's services (called once, during
    /// [`ControlBuilder::spawn`], before the listener starts).
    pub fn routes_with(
        mut self,
        factory: impl FnOnce(&ControlContext) -> Router + Send + 'static,
    ) -> Self {
        self.factories.push(Box::new(factory));
        self
    }

    /// Use this clock instead of the system clock (tests).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Open the stores, bind the listener and start the thread.
    pub fn spawn(self) -> Result<ControlHandle, ControlError> {
        spawn_inner(self)
    }
}

/// Start the control thread with the default routes.
pub fn spawn(
    config: ControlConfig,
    pin_core: Option<usize>,
) -> Result<ControlHandle, ControlError> {
    ControlBuilder::new(config).pin_core(pin_core).spawn()
}

/// Start the control thread with extra routes merged into the server.
pub fn spawn_with_routes(
    config: ControlConfig,
    pin_core: Option<usize>,
    extra: Router,
) -> Result<ControlHandle, ControlError> {
    ControlBuilder::new(config)
        .pin_core(pin_core)
        .routes(extra)
        .spawn()
}

/// Handle to the running control thread.
pub struct ControlHandle {
    local_addr: SocketAddr,
    ks_grpc_addr: Option<SocketAddr>,
    realms: RealmStore,
    shutdown_tx: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ControlError>>>,
    /// The live TLS configuration (HTTPS only), swapped in place on reload.
    tls: Option<LiveTls>,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl ControlHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of the KS gRPC API, when `ks.grpc_listen` is set.
    pub fn ks_grpc_addr(&self) -> Option<SocketAddr> {
        self.ks_grpc_addr
    }

    /// The realms table (provisioning).
    pub fn realms(&self) -> &RealmStore {
        &self.realms
    }

    /// Stop serving (open connections get a grace period) and join the thread.
    pub fn shutdown(mut self) -> Result<(), ControlError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ControlError> {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| ControlError::Thread("control thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "control thread stopped with an error");
        }
    }
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, ControlError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ControlError::Tls(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ControlError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ControlError::Tls(format!(
            "{}: no certificate found",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ControlError::Tls(format!("{}: {e}", key.display())))?;
    // Explicit provider: never depend on which rustls provider other crates enable.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ControlError::Tls(e.to_string()))?;
    // HTTP/1.1 only: HTTP/2 is refused on both listeners (see `serve`).
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn spawn_inner(b: ControlBuilder) -> Result<ControlHandle, ControlError> {
    let ControlBuilder {
        config,
        pin_core,
        extra,
        factories,
        clock,
        http_stats,
        identity_stats,
        identity,
        max_connections,
    } = b;
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(ControlError::Config(problems));
    }
    let shared_key = config
        .ks
        .shared_key
        .as_ref()
        .ok_or_else(|| {
            ControlError::Config(vec![
                "ks.shared_key: not resolved (call ControlConfig::resolve_secrets first)".into(),
            ])
        })?
        .expose()
        .to_owned();
    std::fs::create_dir_all(&config.data_dir).map_err(|e| ControlError::io(&config.data_dir, e))?;

    if let Some(core) = pin_core {
        let known = core_affinity::get_core_ids().unwrap_or_default();
        if !known.iter().any(|c| c.id == core) {
            return Err(ControlError::Config(vec![format!(
                "control core {core}: no such CPU (available: {:?})",
                known.iter().map(|c| c.id).collect::<Vec<_>>()
            )]));
        }
    }

    // Stores. Opening the key store checks the KEK before anything is served.
    let control_db = config.data_dir.join(CONTROL_DB_FILE);
    let nonce_store = Arc::new(NonceStore::open(
        &control_db,
        config.ks.nonce_store_capacity,
    )?);
    let auth = NonceAuthenticator::new(shared_key.as_bytes(), nonce_store, clock.clone());
    let realms = RealmStore::open(&control_db)?;

    let mut key_store = None;
    let key_source = if config.ks_is_local() {
        let kek = config
            .kek()
            .map_err(|e| ControlError::Secret(format!("ks.kek: {e}")))?;
        let store = Arc::new(KeyStore::open(
            &config.data_dir.join(KS_DB_FILE),
            kek.as_ref(),
            config.ks.key_ttl_seconds,
            config.ks.tolerance_seconds,
        )?);
        key_store = Some(store.clone());
        KeySource::Local {
            store,
            clock: clock.clone(),
        }
    } else if let Some(url) = &config.ks.remote_url {
        KeySource::Remote(KsClient::with_clock(
            url,
            &shared_key,
            clock.clone(),
            Duration::from_secs(5),
        ))
    } else {
        KeySource::Unconfigured
    };

    let ais_service = if config.services.ais_enabled() {
        let mut svc = AisService::new(
            config.ais.clone(),
            key_source.clone(),
            &control_db,
            ais::snowflake::process_worker_id(&config.node_id),
            auth.clone(),
            realms.clone(),
        )?;
        // actr 0.4: Ed25519 signing keys sealed with the KEK, TURN credentials under the TURN
        // server's REST secret. Without either, only 0.1.7 clients are served.
        let kek = config
            .kek()
            .map_err(|e| ControlError::Secret(format!("ks.kek: {e}")))?;
        match (kek, &config.turn_rest_secret) {
            (Some(kek), Some(secret)) => {
                let keys = Arc::new(ais::signing::SigningKeys::open(
                    &config.data_dir.join(AIS_SIGNING_DB_FILE),
                    &kek,
                    config.ais.signing_key_ttl_secs,
                    config.ais.signing_key_tolerance_secs,
                    config.ais.key_refresh_ahead_secs,
                )?);
                if let Err(e) = keys.current_or_rotate(clock.now_unix()) {
                    tracing::warn!(error = %e, "AIS: no 0.4 signing key yet; retrying on demand");
                }
                svc = svc.with_v4(keys, secret.expose().as_bytes());
            }
            (None, _) => tracing::warn!("AIS: no KEK resolved; actr 0.4 clients are not served"),
            (_, None) => {
                tracing::warn!("AIS: no TURN REST secret; actr 0.4 clients are not served")
            }
        }
        Some(Arc::new(svc))
    } else {
        None
    };

    // Routes.
    let services = serde_json::json!({
        "ks": key_store.is_some(),
        "ks_remote": config.ks.remote_url.is_some(),
        "ais": ais_service.is_some(),
        "signaling": config.services.signaling_enabled(),
    });
    let node_id = config.node_id.clone();
    let mut app = Router::new().route(
        "/healthz",
        get(move || {
            let body = serde_json::json!({
                "status": "ok",
                "node_id": node_id,
                "services": services,
            });
            async move { Json(body).into_response() }
        }),
    );
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let mut ks_grpc = None;
    if let Some(store) = &key_store {
        let ks_svc = Arc::new(KsService::new(store.clone(), auth.clone()));
        if let Some(addr) = config.ks.grpc_listen {
            let stop = async move {
                let _ = grpc_stop_rx.await;
            };
            let (local, fut) = ks::grpc::serve(ks_svc.clone(), addr, stop)
                .map_err(|e| ControlError::Bind { addr, source: e })?;
            tracing::info!(addr = %local, "KS gRPC (ks.v1.KeyServer) listening");
            ks_grpc = Some((local, fut));
        }
        app = app.nest("/ks", ks::router(ks_svc));
    }
    let ks_grpc_addr = ks_grpc.as_ref().map(|(a, _)| *a);
    if let Some(svc) = &ais_service {
        app = app.nest("/ais", ais::router(svc.clone()));
    }
    let ctx = ControlContext {
        ais: ais_service.clone(),
        keys: key_source.clone(),
        realms: realms.clone(),
        auth: auth.clone(),
        clock: clock.clone(),
    };
    for factory in factories {
        app = app.merge(factory(&ctx));
    }
    let mut app = app.merge(extra);
    let http_stats = http_stats.unwrap_or_default();
    app = app.layer(axum::middleware::from_fn_with_state(
        http_stats.clone(),
        crate::http_stats::track,
    ));
    let app = app.layer(CorsLayer::permissive());

    // Listener and TLS, synchronously, so failures are returned.
    let listener =
        std::net::TcpListener::bind(config.http.listen).map_err(|e| ControlError::Bind {
            addr: config.http.listen,
            source: e,
        })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ControlError::Bind {
            addr: config.http.listen,
            source: e,
        })?;
    let local_addr = listener.local_addr().map_err(|e| ControlError::Bind {
        addr: config.http.listen,
        source: e,
    })?;
    let tls = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(c), Some(k)) => Some(LiveTls(Arc::new(std::sync::RwLock::new(load_tls(c, k)?)))),
        _ => None,
    };
    let tls_handle = tls.clone();
    let total = max_connections
        .unwrap_or(usize::MAX)
        .min(config.http.max_connections);
    let limits = ConnLimits {
        total,
        per_ip: config.http.max_connections_per_ip.min(total),
        first_bytes: Duration::from_secs(config.http.first_bytes_timeout_secs),
        header_read: Duration::from_secs(config.http.header_read_timeout_secs),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .thread_name("actrix-ctl-blocking")
        .build()
        .map_err(|e| ControlError::Thread(format!("cannot build the runtime: {e}")))?;

    let verifier = IdentityVerifier::new(key_source, realms.clone(), config.turn_realm.clone())
        .with_stats(identity_stats.unwrap_or_default());

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let identity_clock = clock.clone();

    let thread = std::thread::Builder::new()
        .name("actrix-control".into())
        .spawn(move || {
            if let Some(core) = pin_core {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    tracing::warn!(core, "could not pin the control thread");
                }
            }
            runtime.block_on(async move {
                let (identity_stop_tx, identity_stop_rx) = oneshot::channel::<()>();
                let identity = identity.map(|channels| {
                    tokio::spawn(identity_loop(
                        verifier,
                        channels,
                        identity_clock,
                        identity_stop_rx,
                    ))
                });
                let refresher = ais_service.map(|svc| tokio::spawn(svc.refresh_loop()));
                let grpc = ks_grpc.map(|(_, fut)| tokio::spawn(fut));
                let res = serve(listener, tls, app, limits, http_stats, shutdown_rx).await;
                let _ = grpc_stop_tx.send(());
                if let Some(g) = grpc {
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, g).await;
                }
                if let Some(r) = refresher {
                    r.abort();
                }
                // Let the identity loop answer what it still holds before the runtime ends.
                let _ = identity_stop_tx.send(());
                if let Some(task) = identity {
                    let _ = task.await;
                }
                res
            })
        })
        .map_err(|e| ControlError::Thread(e.to_string()))?;

    tracing::info!(
        addr = %local_addr,
        max_connections = limits.total,
        max_connections_per_ip = limits.per_ip,
        "control plane listening"
    );
    Ok(ControlHandle {
        local_addr,
        ks_grpc_addr,
        realms,
        shutdown_tx: Some(shutdown_tx),
        thread: Some(thread),
        tls: tls_handle,
    })
}

impl ControlHandle {
    /// Re-read the certificate chain and key (after a renewal) and use them for every new
    /// connection; connections already open keep their session. Errors leave the old
    /// certificate in force. `Ok(false)` when the server runs plain HTTP.
    pub fn reload_tls(
        &self,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<bool, ControlError> {
        let Some(live) = &self.tls else {
            return Ok(false);
        };
        live.replace(load_tls(cert, key)?);
        Ok(true)
    }
}

/// How the control listener admits and times connections: the `[http]` limits, with the
/// total lowered to the descriptor budget the binary computed ([`ControlBuilder::max_connections`]).
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    total: usize,
    per_ip: usize,
    first_bytes: Duration,
    header_read: Duration,
}

/// Connections open, in all and per source address. A connection is counted from accept until
/// its descriptor is closed, an upgraded WebSocket included (the guard travels inside the I/O
/// object hyper hands to the upgrade), so the caps bound descriptors, not requests.
struct Admission {
    limits: ConnLimits,
    state: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, u32>)>,
    stats: Arc<crate::http_stats::HttpStats>,
}

/// One admitted connection; dropping it gives the slot back.
struct ConnGuard {
    admission: Arc<Admission>,
    ip: std::net::IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self
            .admission
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut e) = st.1.entry(self.ip) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.admission
            .stats
            .conns
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ConnGuard> {
        use crate::http_stats::ConnStats;
        let c = &self.stats.conns;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 >= self.limits.total {
            ConnStats::bump(&c.refused_total_cap);
            return None;
        }
        let n = st.1.entry(ip).or_insert(0);
        if *n as usize >= self.limits.per_ip {
            ConnStats::bump(&c.refused_per_ip);
            return None;
        }
        *n += 1;
        st.0 += 1;
        drop(st);
        ConnStats::bump(&c.accepted);
        ConnStats::bump(&c.open);
        Some(ConnGuard {
            admission: self.clone(),
            ip,
        })
    }
}

/// The transport under HTTP: plain TCP or TLS over it.
enum Transport {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// A connection as hyper sees it: the transport, the first bytes read while detecting the
/// protocol (replayed to hyper), and the admission slot it holds.
struct Conn {
    io: Transport,
    head: [u8; 4],
    pos: u8,
    len: u8,
    _guard: ConnGuard,
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.len {
            let head = &this.head[this.pos as usize..this.len as usize];
            let n = head.len().min(buf.remaining());
            buf.put_slice(&head[..n]);
            this.pos += n as u8;
            return std::task::Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.io {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_write(cx, data),
            Transport::Tls(s) => std::pin::Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.io {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.io {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.io {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The start of the HTTP/2 connection preface ("PRI * HTTP/2.0..."). PRI is not an HTTP/1
/// method anyone uses (RFC 9113 §3.4 reserves it for this), so four bytes decide.
const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// What the first bytes of a connection say.
enum Sniffed {
    /// HTTP/1: this many bytes of `Conn::head` were read.
    Http1(u8),
    /// The HTTP/2 preface, or the end of the stream before a request.
    Refuse,
}

/// Read until the first bytes differ from the HTTP/2 preface (HTTP/1) or match its start.
/// Unbounded in time: the caller puts a deadline on it.
async fn sniff(io: &mut Transport, head: &mut [u8; 4]) -> std::io::Result<Sniffed> {
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    while n < head.len() {
        let k = match io {
            Transport::Plain(s) => s.read(&mut head[n..]).await?,
            Transport::Tls(s) => s.read(&mut head[n..]).await?,
        };
        if k == 0 {
            return Ok(Sniffed::Refuse);
        }
        n += k;
        if head[..n] != H2_PREFACE_START[..n] {
            return Ok(Sniffed::Http1(n as u8));
        }
    }
    Ok(Sniffed::Refuse)
}

/// Connection tasks still serving (hyper has not finished with them), for the graceful
/// shutdown.
#[derive(Default)]
struct Serving {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

struct ServingGuard(Arc<Serving>);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// The control listener, plain HTTP or HTTPS: admission (total and per-IP caps, checked at
/// accept), a deadline for the first bytes (the TLS handshake included) within which the
/// protocol must show, cleartext and TLS HTTP/2 refused (nothing here speaks it: hyper's
/// detection alone would wait forever for a preface and serve HTTP/2 with no idle timeout),
/// then hyper's HTTP/1 with upgrades (WebSocket) and a header read timeout that also bounds
/// how long a keep-alive connection idles. The peer address is the request's `ConnectInfo`;
/// TCP_NODELAY is set (signaling envelopes are small writes on long-lived connections:
/// without it, Nagle plus delayed ACKs add tens of milliseconds per hop). Shutdown is graceful
/// and capped at `SHUTDOWN_GRACE`, so a stuck client or a long-lived WebSocket cannot hold the
/// process.
async fn serve(
    listener: std::net::TcpListener,
    tls: Option<LiveTls>,
    app: Router,
    limits: ConnLimits,
    stats: Arc<crate::http_stats::HttpStats>,
    mut shutdown_rx: oneshot::Receiver<()>,
) -> Result<(), ControlError> {
    use crate::http_stats::ConnStats;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| ControlError::Thread(format!("listener: {e}")))?;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let builder = Arc::new(builder);
    let admission = Arc::new(Admission {
        limits,
        state: Default::default(),
        stats: stats.clone(),
    });
    let serving = Arc::new(Serving::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut accept_errors_logged = false;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: say so once, back off, keep serving.
                    ConnStats::bump(&stats.conns.accept_errors);
                    if !accept_errors_logged {
                        tracing::warn!(error = %e, "control HTTP accept failed");
                        accept_errors_logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown_rx => break,
        };
        accept_errors_logged = false;
        // Over a cap: the descriptor is closed right here, before anything is read.
        let Some(guard) = admission.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let acceptor = tls.as_ref().map(LiveTls::acceptor);
        let builder = builder.clone();
        let stats = stats.clone();
        let mut stop = stop_rx.clone();
        serving
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let serving_guard = ServingGuard(serving.clone());
        tokio::spawn(async move {
            let _serving = serving_guard;
            let deadline = tokio::time::Instant::now() + limits.first_bytes;
            let opening = async {
                let mut io = match acceptor {
                    None => Transport::Plain(stream),
                    Some(a) => match a.accept(stream).await {
                        Ok(s) => Transport::Tls(Box::new(s)),
                        Err(_) => {
                            ConnStats::bump(&stats.conns.tls_failures);
                            return None;
                        }
                    },
                };
                let mut head = [0u8; 4];
                match sniff(&mut io, &mut head).await {
                    Ok(Sniffed::Http1(len)) => Some((io, head, len)),
                    Ok(Sniffed::Refuse) => {
                        if head.starts_with(&H2_PREFACE_START[..1]) {
                            ConnStats::bump(&stats.conns.refused_http2);
                        }
                        None
                    }
                    Err(_) => None,
                }
            };
            let opened = tokio::select! {
                r = tokio::time::timeout_at(deadline, opening) => match r {
                    Ok(v) => v,
                    Err(_) => {
                        ConnStats::bump(&stats.conns.first_bytes_timeouts);
                        None
                    }
                },
                _ = stop.changed() => None,
            };
            // Refused or timed out: dropping the transport closes the descriptor.
            let Some((io, head, len)) = opened else {
                return;
            };
            let conn = Conn {
                io,
                head,
                pos: 0,
                len,
                _guard: guard,
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(conn), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = async {
        loop {
            let idle = serving.idle.notified();
            if serving.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drained).await;
    Ok(())
}

/// The TLS configuration in force, swapped in place on reload; each new connection takes the
/// current one.
#[derive(Clone)]
struct LiveTls(Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>);

impl LiveTls {
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn replace(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }
}

/// Answer identity requests on the control thread, each on the asking shard's channel.
/// Requests whose key must come from a remote KS are parked while one fetch per key id runs on
/// the blocking pool.
async fn identity_loop(
    mut verifier: IdentityVerifier,
    channels: IdentityChannels,
    clock: SharedClock,
    mut stop: oneshot::Receiver<()>,
) {
    let IdentityChannels {
        mut requests,
        answers,
    } = channels;
    let reply = |q: IdentityRequest, r: Result<crate::TurnIdentity, IdentityError>| {
        if let Some(tx) = answers.get(q.shard.index()) {
            // A shard that is gone (shutdown) needs no answer.
            let _ = tx.send(identity::answer(q.username, r));
        }
    };
    let (done_tx, mut done_rx) =
        mpsc::unbounded_channel::<(KeyId, Result<SecretRecord, KeySourceError>)>();
    let mut pending: std::collections::HashMap<KeyId, Vec<IdentityRequest>> = Default::default();
    let mut pending_count = 0usize;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            q = requests.recv() => {
                let Some(q) = q else { break };
                let now_unix = clock.now_unix();
                match verifier.readiness(now_unix, &q.username) {
                    Readiness::Ready => {
                        let r = verifier.verify(now_unix, &q.username);
                        reply(q, r);
                    }
                    Readiness::NeedsKey(key_id) => {
                        if pending_count >= MAX_PENDING_QUERIES {
                            reply(q, Err(IdentityError::Overloaded));
                            continue;
                        }
                        pending_count += 1;
                        let waiting = pending.entry(key_id).or_default();
                        waiting.push(q);
                        if waiting.len() == 1 {
                            let source = verifier.key_source().clone();
                            let done = done_tx.clone();
                            tokio::task::spawn_blocking(move || {
                                let _ = done.send((key_id, source.secret(key_id)));
                            });
                        }
                    }
                }
            }
            Some((key_id, result)) = done_rx.recv() => {
                let now_unix = clock.now_unix();
                verifier.insert_fetched(now_unix, key_id, &result);
                for q in pending.remove(&key_id).unwrap_or_default() {
                    pending_count -= 1;
                    let r = match &result {
                        Err(KeySourceError::Unavailable(_)) => Err(IdentityError::KeyUnavailable),
                        Err(KeySourceError::Internal(_)) => Err(IdentityError::Internal),
                        _ => verifier.verify(now_unix, &q.username),
                    };
                    reply(q, r);
                }
            }
        }
    }
    // Shutdown: what is parked gets a retryable refusal (the shards may still be draining).
    for (_, queries) in pending.drain() {
        for q in queries {
            reply(q, Err(IdentityError::Internal));
        }
    }
}
