//! Cross-node signaling over NATS: the `[cluster]` configuration, the bus messages, and the
//! bridge that connects the hub to the bus.
//!
//! The hub stays a synchronous state machine (`hub/cluster.rs` decides what goes where); this
//! module is only transport. The bridge runs on a thread of its own (`actrix-cluster`, a
//! current-thread tokio runtime) so the control thread never waits on the bus: it takes the
//! hub's [`ClusterOut`]s from a bounded queue and publishes them, and feeds what it receives
//! into the hub with [`Hub::handle_remote`] under the hub's lock.
//!
//! Subjects (`<prefix>` is `cluster.subject_prefix`, default `actrix`):
//! - `<prefix>.all`: registrations (Up), departures (Down), load, heartbeats and resync
//!   requests, to every node;
//! - `<prefix>.node.<node_id>`: relays for actors of that node.
//!
//! Liveness: every node heartbeats each `heartbeat_interval_ms`; a node not heard for
//! `node_timeout_ms` is gone and its actors leave the hub. A node that is heard for the first
//! time (or restarted: its incarnation changed) makes everybody announce their actors again.
//! When the bus connection drops, the remote actors leave (local-only routing, one log line,
//! `actrix_signaling_cluster_connected 0`); when it returns, every node resyncs.
//!
//! What it deliberately is not: no persistence of remote state, no delivery guarantee (the bus
//! is at-most-once, like a WebSocket that drops), no cross-node credential verification (an
//! actor's credential is checked by the node it is connected to).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::hub::{ActorKey, ClusterOut, Hub, Proto, RemoteActor, RemoteEvent};
use crate::proto::{Acl, ActrId, ServiceSpec, SignalingEnvelope};
use crate::stats::SignalingStats;

/// The `[cluster]` section: this node's identity on the bus and how to reach the bus.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name on the bus (letters, digits, `-` and `_`; unique in the cluster).
    /// Empty: the `[node] id`.
    pub node_id: String,
    /// NATS servers, e.g. `["nats://10.0.0.5:4222"]` (`tls://` for TLS).
    pub urls: Vec<String>,
    /// First token of every subject, so several clusters can share one NATS. Default `actrix`.
    pub subject_prefix: String,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// User and password authentication.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// Refuse a server that does not offer TLS.
    pub tls_required: bool,
    /// CA certificate (PEM) to verify the NATS server with, instead of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// How often this node heartbeats on the bus, milliseconds. Default 1000.
    pub heartbeat_interval_ms: u64,
    /// A node not heard for this long is gone and its actors leave, milliseconds. Default 5000.
    pub node_timeout_ms: u64,
    /// Messages waiting to be published before new ones are dropped (counted). Default 65536.
    pub queue_len: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: String::new(),
            urls: Vec::new(),
            subject_prefix: "actrix".into(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            heartbeat_interval_ms: 1000,
            node_timeout_ms: 5000,
            queue_len: 65536,
        }
    }
}

fn subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ClusterConfig {
    /// Every problem, one line each (keys named `cluster.<key>`).
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if !self.node_id.is_empty() && !subject_token(&self.node_id) {
            e.push(format!(
                "cluster.node_id: {:?} must be letters, digits, '-' or '_'",
                self.node_id
            ));
        }
        if self.urls.is_empty() {
            e.push("cluster.urls: at least one NATS server is required".into());
        }
        for u in &self.urls {
            if u.parse::<async_nats::ServerAddr>().is_err() {
                e.push(format!("cluster.urls: {u:?} is not a NATS server address"));
            }
        }
        if !self.subject_prefix.split('.').all(subject_token) {
            e.push(format!(
                "cluster.subject_prefix: {:?} must be dot-separated tokens of letters, digits, '-' or '_'",
                self.subject_prefix
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            e.push("cluster.user and cluster.password: set both or neither".into());
        }
        let methods = usize::from(self.credentials_file.is_some())
            + usize::from(self.user.is_some())
            + usize::from(self.token.is_some());
        if methods > 1 {
            e.push("cluster: choose one of credentials_file, user/password and token".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            e.push("cluster.tls_cert_file and cluster.tls_key_file: set both or neither".into());
        }
        for (k, p) in [
            ("credentials_file", &self.credentials_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    e.push(format!(
                        "cluster.{k}: {} is not a readable file",
                        p.display()
                    ));
                }
            }
        }
        if self.heartbeat_interval_ms == 0 {
            e.push("cluster.heartbeat_interval_ms: must be at least 1".into());
        }
        if self.node_timeout_ms < self.heartbeat_interval_ms.saturating_mul(2) {
            e.push("cluster.node_timeout_ms: must be at least twice heartbeat_interval_ms".into());
        }
        if self.queue_len == 0 {
            e.push("cluster.queue_len: must be at least 1".into());
        }
        e
    }
}

// ----- bus messages -----

/// One bus message: the sending node, its incarnation (random per process start) and one
/// event. Protobuf, like everything else signaling speaks; the actor and envelope fields are
/// the 0.1.7 messages unchanged.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BusMessage {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(uint64, tag = "2")]
    pub incarnation: u64,
    #[prost(oneof = "bus_message::Kind", tags = "3, 4, 5, 6, 7, 8")]
    pub kind: Option<bus_message::Kind>,
}

pub mod bus_message {
    /// What a bus message carries. One lives per publish or receive, so its size does not
    /// matter.
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "3")]
        Heartbeat(super::Heartbeat),
        #[prost(message, tag = "4")]
        Up(super::BusActor),
        #[prost(message, tag = "5")]
        Down(super::BusKey),
        #[prost(message, tag = "6")]
        Load(super::BusLoad),
        #[prost(message, tag = "7")]
        Deliver(super::BusDeliver),
        /// Announce your actors again.
        #[prost(message, tag = "8")]
        Resync(super::Heartbeat),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BusKey {
    #[prost(uint32, tag = "1")]
    pub realm: u32,
    #[prost(uint64, tag = "2")]
    pub serial: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BusActor {
    #[prost(message, optional, tag = "1")]
    pub actr_id: Option<ActrId>,
    /// 1 = actr 0.1.7, 4 = actr 0.4.
    #[prost(uint32, tag = "2")]
    pub proto: u32,
    #[prost(message, optional, tag = "3")]
    pub spec: Option<ServiceSpec>,
    #[prost(message, optional, tag = "4")]
    pub acl: Option<Acl>,
    #[prost(string, optional, tag = "5")]
    pub ws_address: Option<String>,
    #[prost(bool, tag = "6")]
    pub wants_answer: bool,
    #[prost(int32, optional, tag = "7")]
    pub availability: Option<i32>,
    #[prost(float, optional, tag = "8")]
    pub power_reserve: Option<f32>,
    #[prost(float, optional, tag = "9")]
    pub mailbox_backlog: Option<f32>,
    #[prost(bool, tag = "10")]
    pub fresh: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BusLoad {
    #[prost(message, optional, tag = "1")]
    pub key: Option<BusKey>,
    #[prost(int32, tag = "2")]
    pub availability: i32,
    #[prost(float, tag = "3")]
    pub power_reserve: f32,
    #[prost(float, tag = "4")]
    pub mailbox_backlog: f32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BusDeliver {
    #[prost(message, optional, tag = "1")]
    pub to: Option<BusKey>,
    #[prost(message, optional, tag = "2")]
    pub envelope: Option<SignalingEnvelope>,
}

fn bus_key(k: ActorKey) -> BusKey {
    BusKey {
        realm: k.realm,
        serial: k.serial,
    }
}

fn actor_key(k: &BusKey) -> ActorKey {
    ActorKey {
        realm: k.realm,
        serial: k.serial,
    }
}

/// The bus form of a hub event.
pub fn encode_event(ev: RemoteEvent) -> bus_message::Kind {
    use bus_message::Kind;
    match ev {
        RemoteEvent::Up(a) => Kind::Up(BusActor {
            actr_id: Some(a.actr_id),
            proto: match a.proto {
                Proto::V1 => 1,
                Proto::V4 => 4,
            },
            spec: a.spec,
            acl: a.acl,
            ws_address: a.ws_address,
            wants_answer: a.wants_answer,
            availability: a.availability,
            power_reserve: a.power_reserve,
            mailbox_backlog: a.mailbox_backlog,
            fresh: a.fresh,
        }),
        RemoteEvent::Down(k) => Kind::Down(bus_key(k)),
        RemoteEvent::Load {
            key,
            availability,
            power_reserve,
            mailbox_backlog,
        } => Kind::Load(BusLoad {
            key: Some(bus_key(key)),
            availability,
            power_reserve,
            mailbox_backlog,
        }),
        RemoteEvent::Deliver { to, envelope } => Kind::Deliver(BusDeliver {
            to: Some(bus_key(to)),
            envelope: Some(envelope),
        }),
    }
}

/// The hub event of a bus message (`None` for a heartbeat, a resync or a malformed message).
pub fn decode_event(kind: bus_message::Kind) -> Option<RemoteEvent> {
    use bus_message::Kind;
    Some(match kind {
        Kind::Up(a) => RemoteEvent::Up(Box::new(RemoteActor {
            actr_id: a.actr_id?,
            proto: match a.proto {
                1 => Proto::V1,
                4 => Proto::V4,
                _ => return None,
            },
            spec: a.spec,
            acl: a.acl,
            ws_address: a.ws_address,
            wants_answer: a.wants_answer,
            availability: a.availability,
            power_reserve: a.power_reserve,
            mailbox_backlog: a.mailbox_backlog,
            fresh: a.fresh,
        })),
        Kind::Down(k) => RemoteEvent::Down(actor_key(&k)),
        Kind::Load(l) => RemoteEvent::Load {
            key: actor_key(l.key.as_ref()?),
            availability: l.availability,
            power_reserve: l.power_reserve,
            mailbox_backlog: l.mailbox_backlog,
        },
        Kind::Deliver(d) => RemoteEvent::Deliver {
            to: actor_key(d.to.as_ref()?),
            envelope: d.envelope?,
        },
        Kind::Heartbeat(_) | Kind::Resync(_) => return None,
    })
}

// ----- the bridge -----

/// Runs `f` on the hub under its lock with the current time, then carries out the hub's
/// outputs (the I/O layer's drain).
pub(crate) type WithHub = Arc<dyn Fn(&mut dyn FnMut(&mut Hub, u64)) + Send + Sync>;

/// The queue the hub's cluster outputs go into.
pub(crate) type OutTx = tokio::sync::mpsc::Sender<ClusterOut>;

/// Start the bridge thread. `rx` receives the hub's cluster outputs.
pub(crate) fn spawn_bridge(
    cfg: ClusterConfig,
    node_id: String,
    incarnation: u64,
    stats: Arc<SignalingStats>,
    with_hub: WithHub,
    rx: tokio::sync::mpsc::Receiver<ClusterOut>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("actrix-cluster".into())
        .spawn(move || {
            runtime.block_on(bridge(cfg, node_id, incarnation, stats, with_hub, rx));
        })?;
    Ok(())
}

enum Conn {
    Up,
    Down,
}

async fn options(
    cfg: &ClusterConfig,
    node_id: &str,
    events: tokio::sync::mpsc::UnboundedSender<Conn>,
) -> std::io::Result<async_nats::ConnectOptions> {
    let mut o = match &cfg.credentials_file {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p.clone()).await?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        o = o.token(t.clone());
    }
    if cfg.tls_required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    Ok(o.name(format!("actrix-{node_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_millis(cfg.heartbeat_interval_ms.max(1000)))
        // Reconnect quickly: while the bus is away the cluster routes local-only.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64).saturating_mul(100).min(1000))
        })
        .event_callback(move |ev| {
            let events = events.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        let _ = events.send(Conn::Up);
                    }
                    async_nats::Event::Disconnected => {
                        let _ = events.send(Conn::Down);
                    }
                    other => tracing::debug!(event = %other, "cluster: NATS event"),
                }
            }
        }))
}

struct Peer {
    incarnation: u64,
    last_seen: tokio::time::Instant,
}

// The bridge is I/O: it reads the clock for heartbeats and node timeouts.
#[allow(clippy::disallowed_methods)]
async fn bridge(
    cfg: ClusterConfig,
    node_id: String,
    incarnation: u64,
    stats: Arc<SignalingStats>,
    with_hub: WithHub,
    mut rx: tokio::sync::mpsc::Receiver<ClusterOut>,
) {
    use futures_util::StreamExt;
    use prost::Message as _;
    use std::sync::atomic::Ordering::Relaxed;

    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = match options(&cfg, &node_id, ev_tx).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "cluster: cannot read the NATS credentials; cluster off");
            return;
        }
    };
    let client = match opts.connect(cfg.urls.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cluster: cannot start the NATS client; cluster off");
            return;
        }
    };
    let all = format!("{}.all", cfg.subject_prefix);
    let mine = format!("{}.node.{node_id}", cfg.subject_prefix);
    let (mut sub_all, mut sub_mine) = match (
        client.subscribe(all.clone()).await,
        client.subscribe(mine.clone()).await,
    ) {
        (Ok(a), Ok(m)) => (a, m),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cluster: cannot subscribe; cluster off");
            return;
        }
    };
    let message = |kind: bus_message::Kind| {
        BusMessage {
            node: node_id.clone(),
            incarnation,
            kind: Some(kind),
        }
        .encode_to_vec()
    };
    let mut connected = false;
    let mut peers: HashMap<String, Peer> = HashMap::new();
    let timeout = Duration::from_millis(cfg.node_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.heartbeat_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(Conn::Up) => {
                    if !connected {
                        connected = true;
                        stats.cluster_connected.store(1, Relaxed);
                        tracing::info!(node = %node_id, "cluster: connected to NATS; cross-node routing on");
                        // Ask everyone for their actors and tell them ours.
                        let _ = client.publish(all.clone(), message(bus_message::Kind::Resync(Heartbeat {})).into()).await;
                        with_hub(&mut |hub, now| hub.handle_resync(now));
                    }
                }
                Some(Conn::Down) => {
                    if connected {
                        connected = false;
                        stats.cluster_connected.store(0, Relaxed);
                        stats.cluster_outages.fetch_add(1, Relaxed);
                        stats.cluster_nodes.store(0, Relaxed);
                        tracing::warn!(node = %node_id, "cluster: lost the NATS connection; routing local-only until it returns");
                        peers.clear();
                        with_hub(&mut |hub, now| hub.handle_cluster_lost(now));
                    }
                }
                None => return,
            },
            out = rx.recv() => {
                let Some(out) = out else { return };
                // Publish what is queued in one go (the client writes it in one flush).
                let mut next = Some(out);
                let mut n = 0;
                while let Some(out) = next.take() {
                    n += 1;
                    if !connected {
                        // The resync after the reconnect carries the state; relays are lost,
                        // as they would be to a peer that is away.
                        stats.cluster_dropped.fetch_add(1, Relaxed);
                    } else {
                        let (subject, kind) = match out {
                            ClusterOut::Broadcast(ev) => (all.clone(), encode_event(ev)),
                            ClusterOut::Deliver { node, to, envelope } => (
                                format!("{}.node.{node}", cfg.subject_prefix),
                                encode_event(RemoteEvent::Deliver { to, envelope }),
                            ),
                        };
                        if client.publish(subject, message(kind).into()).await.is_err() {
                            stats.cluster_dropped.fetch_add(1, Relaxed);
                        }
                    }
                    if n < BATCH {
                        next = rx.try_recv().ok();
                    }
                }
            }
            m = sub_all.next() => {
                let Some(m) = m else { return };
                let mut batch = vec![m.payload];
                ready(&mut sub_all, &mut sub_mine, &mut batch);
                on_messages(batch, &node_id, &mut peers, &stats, &with_hub, &client, &all, &message).await;
            }
            m = sub_mine.next() => {
                let Some(m) = m else { return };
                let mut batch = vec![m.payload];
                ready(&mut sub_all, &mut sub_mine, &mut batch);
                on_messages(batch, &node_id, &mut peers, &stats, &with_hub, &client, &all, &message).await;
            }
            _ = tick.tick() => {
                if connected {
                    let _ = client.publish(all.clone(), message(bus_message::Kind::Heartbeat(Heartbeat {})).into()).await;
                }
                let now = tokio::time::Instant::now();
                let gone: Vec<String> = peers
                    .iter()
                    .filter(|(_, p)| now.duration_since(p.last_seen) > timeout)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in gone {
                    peers.remove(&n);
                    tracing::warn!(node = %n, "cluster: node stopped heartbeating; its actors leave");
                    with_hub(&mut |hub, now| hub.handle_node_gone(now, &n));
                }
                stats.cluster_nodes.store(peers.len() as u64, Relaxed);
            }
        }
    }
}

/// Most bus messages handled under one hub lock.
const BATCH: usize = 256;

/// Take the messages both subscriptions already hold (up to [`BATCH`]) without waiting.
fn ready(
    a: &mut async_nats::Subscriber,
    b: &mut async_nats::Subscriber,
    batch: &mut Vec<axum::body::Bytes>,
) {
    use futures_util::{FutureExt, StreamExt};
    while batch.len() < BATCH {
        let before = batch.len();
        if let Some(Some(m)) = a.next().now_or_never() {
            batch.push(m.payload);
        }
        if let Some(Some(m)) = b.next().now_or_never() {
            batch.push(m.payload);
        }
        if batch.len() == before {
            return;
        }
    }
}

/// What a batch of bus messages asks of the hub, in arrival order (a short-lived list, so
/// the events are not boxed).
#[allow(clippy::large_enum_variant)]
enum Action {
    NodeGone(String),
    Resync,
    Remote(String, RemoteEvent),
}

#[allow(clippy::too_many_arguments, clippy::disallowed_methods)]
async fn on_messages(
    batch: Vec<axum::body::Bytes>,
    node_id: &str,
    peers: &mut HashMap<String, Peer>,
    stats: &SignalingStats,
    with_hub: &WithHub,
    client: &async_nats::Client,
    all: &str,
    message: &impl Fn(bus_message::Kind) -> Vec<u8>,
) {
    let mut actions = Vec::with_capacity(batch.len());
    for payload in &batch {
        on_message(
            payload,
            node_id,
            peers,
            stats,
            client,
            all,
            message,
            &mut actions,
        )
        .await;
    }
    if actions.is_empty() {
        return;
    }
    let mut actions = Some(actions);
    with_hub(&mut |hub, now| {
        for a in actions.take().into_iter().flatten() {
            match a {
                Action::NodeGone(n) => hub.handle_node_gone(now, &n),
                Action::Resync => hub.handle_resync(now),
                Action::Remote(n, ev) => hub.handle_remote(now, &n, ev),
            }
        }
    });
}

#[allow(clippy::too_many_arguments, clippy::disallowed_methods)]
async fn on_message(
    payload: &[u8],
    node_id: &str,
    peers: &mut HashMap<String, Peer>,
    stats: &SignalingStats,
    client: &async_nats::Client,
    all: &str,
    message: &impl Fn(bus_message::Kind) -> Vec<u8>,
    actions: &mut Vec<Action>,
) {
    use prost::Message as _;
    let Ok(m) = BusMessage::decode(payload) else {
        tracing::debug!("cluster: undecodable bus message dropped");
        return;
    };
    if m.node == node_id {
        return;
    }
    let now = tokio::time::Instant::now();
    let new = match peers.get_mut(&m.node) {
        Some(p) if p.incarnation == m.incarnation => {
            p.last_seen = now;
            false
        }
        Some(p) => {
            // The node restarted: what it had before is gone.
            p.incarnation = m.incarnation;
            p.last_seen = now;
            actions.push(Action::NodeGone(m.node.clone()));
            true
        }
        None => {
            peers.insert(
                m.node.clone(),
                Peer {
                    incarnation: m.incarnation,
                    last_seen: now,
                },
            );
            true
        }
    };
    stats
        .cluster_nodes
        .store(peers.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if new {
        tracing::info!(node = %m.node, "cluster: node joined");
        // A node we did not know: it needs our actors, and we its (unless this message is
        // already its resync answer, which the request below makes harmless to repeat).
        let _ = client
            .publish(
                all.to_owned(),
                message(bus_message::Kind::Resync(Heartbeat {})).into(),
            )
            .await;
        actions.push(Action::Resync);
    }
    let Some(kind) = m.kind else { return };
    if matches!(kind, bus_message::Kind::Resync(_)) {
        if !new {
            actions.push(Action::Resync);
        }
        return;
    }
    if let Some(ev) = decode_event(kind) {
        actions.push(Action::Remote(m.node, ev));
    }
}
