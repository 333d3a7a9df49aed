//! The sans-IO signaling core: a state machine fed connection events, decoded envelopes (with
//! the verdict on their credential) and the time, that queues what to send where.
//!
//! Run-loop contract: after every `handle_*` call, drain [`Hub::poll_output`] until it returns
//! `None`. The hub owns no socket, reads no clock and touches no disk: realm validity comes
//! through [`RealmCheck`], credentials are verified by the I/O layer before the envelope is
//! handed in ([`CredentialVerdict`]), AIS calls, persistence and registry restores are
//! [`Output`]s whose results come back through [`Hub::handle_register_result`],
//! [`Hub::handle_refresh_result`] and [`Hub::handle_restored`].
//!
//! Time: every entry point and internal handler takes the time as its first parameter,
//! `now_unix_ms`, wall-clock Unix milliseconds (what `Clock::now_unix_ms` reads; wire fields in
//! seconds are derived from it), never a monotonic reading.
//!
//! Code map:
//! - this file: the [`Hub`] and every entry point (`handle_*`, [`Hub::envelope_error`],
//!   [`Hub::poll_output`]), the connection table, the types the I/O layer sees ([`ConnId`],
//!   [`ActorKey`], [`Output`], [`AisCall`], ...), envelope building, the credential checks
//!   every authenticated flow passes, and the dispatch of `actr_to_server` payloads.
//! - `registry.rs`: registration, unregistration, Ping (heartbeats, restores), credential
//!   refresh, heartbeat eviction, and the persistence operations they emit.
//! - `acl.rs`: the ACL table (default deny) and the rules a registration installs.
//! - `presence.rs`: ActrUp subscriptions, ActrUp events, departed subscribers.
//! - `discovery.rs`: discovery, service spec lookup, route candidates with compatibility
//!   ranking, and the spec table behind it.
//! - `relay.rs`: SDP, ICE and ICE-restart relay between actors, and role negotiation.
//! - `cluster.rs`: remote actors and the cross-node events ([`RemoteEvent`], [`ClusterOut`]).
//!
//! Architecture invariants:
//! - Nothing routes across realms: every lookup is keyed by the source's realm.
//! - Every `actr_to_server` and `actr_relay` envelope is refused unless its credential decrypts,
//!   is unexpired, names `source` (`claims.actor_id`) and the connection is bound to `source`
//!   (wire section 9.1).
//! - Forwarded relays and RoleAssignments carry an empty credential (wire section 9.3).
//! - Iteration order never depends on a hash map: the registry is a `BTreeMap`.

mod acl;
mod cluster;
mod discovery;
mod presence;
mod registry;
mod relay;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;

use crate::config::SignalingConfig;
use crate::proto::*;
use crate::stats::{self, SignalingStats};

pub use cluster::{ClusterOut, RemoteActor, RemoteEvent};
pub use discovery::{analyze_compatibility, type_base};
pub use registry::{placeholder_id, PendingPing, PersistOp, PersistedEntry};

use acl::AclTable;
use discovery::SpecTable;
use presence::Presence;
use registry::Entry;

/// The actr protocol a connection speaks: 0.1.7 (`V1`) or 0.4.21 (`V4`). The I/O layer tells
/// them apart (control/WIRE-0.4.md, "Telling the versions apart") and translates 0.4
/// envelopes to and from the 0.1.7 types the hub works with; the hub keeps the two
/// populations apart: discovery, route candidates, relays, role negotiation and ActrUp events
/// only ever involve actors of the caller's protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// actr-protocol 0.1.7 (ECIES tokens, PSK).
    #[default]
    V1,
    /// actr-protocol 0.4.21 (Ed25519 claims, REST-style TURN credentials).
    V4,
}

/// What a 0.4 actor registered with at the AIS (it registers over HTTP, not on the WebSocket),
/// applied when its connection binds: the spec, the ACL (as 0.1.7 rules for this actor's
/// realm) and the direct WebSocket address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registration {
    pub spec: Option<ServiceSpec>,
    pub acl: Option<Acl>,
    pub ws_address: Option<String>,
}

/// One WebSocket connection, as numbered by the I/O layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Delivery key of an actor: realm and serial (the type is ignored for delivery, wire 8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorKey {
    pub realm: u32,
    pub serial: u64,
}

impl ActorKey {
    /// The key of `id`.
    pub fn of(id: &ActrId) -> Self {
        ActorKey {
            realm: id.realm.realm_id,
            serial: id.serial_number,
        }
    }

    /// Every key of `realm`, for range scans of the registry.
    fn realm_range(realm: u32) -> RangeInclusive<ActorKey> {
        ActorKey { realm, serial: 0 }..=ActorKey {
            realm,
            serial: u64::MAX,
        }
    }
}

/// A credential the I/O layer decrypted and parsed (wire section 5.4 steps 1-3). The hub
/// applies the time- and identity-dependent checks itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCredential {
    /// `claims.actor_id`.
    pub actor_id: String,
    /// `claims.realm_id`.
    pub realm_id: u32,
    /// `claims.expr_time`.
    pub expr_time: u64,
    /// The KS key's `expires_at` (0 = never).
    pub key_expires_at: u64,
    /// The KS key's tolerance.
    pub key_tolerance: u64,
}

impl VerifiedCredential {
    /// Wire section 5.4: `expires_at ≠ 0 && expires_at < now ≤ expires_at + tolerance`, with
    /// `now_unix` in Unix seconds.
    pub fn key_in_tolerance(&self, now_unix: u64) -> bool {
        self.key_expires_at != 0
            && self.key_expires_at < now_unix
            && now_unix <= self.key_expires_at.saturating_add(self.key_tolerance)
    }
}

/// The I/O layer's verdict on an envelope's credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialVerdict {
    Valid(Arc<VerifiedCredential>),
    /// Why it does not decrypt or parse (unknown key, bad token, ...).
    Invalid(String),
}

/// Realm validity (wire section 8.6), answered by the I/O layer (a cache over the realms
/// table) or by a test double.
pub trait RealmCheck {
    /// `Ok` when the realm exists, is Normal and not expired at `now_unix_ms`.
    fn check_realm(&mut self, now_unix_ms: u64, realm_id: u32) -> Result<(), String>;
}

/// An AIS call the I/O layer runs on the blocking pool.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "an AIS call the I/O layer must run and answer"]
pub enum AisCall {
    /// Register a new actor; answer with [`Hub::handle_register_result`].
    Register {
        conn: ConnId,
        reply_for: String,
        request: RegisterRequest,
    },
    /// Re-issue a credential for the same `source`; answer with [`Hub::handle_refresh_result`].
    Refresh {
        conn: ConnId,
        reply_for: String,
        source: ActrId,
    },
}

/// What the hub wants done.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "an output the I/O layer must carry out"]
pub enum Output {
    /// Send this envelope on this connection.
    Send {
        conn: ConnId,
        envelope: SignalingEnvelope,
    },
    /// Close this connection with a WebSocket close code.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    Ais(AisCall),
    Persist(PersistOp),
    /// Look the actor up in the database and call [`Hub::handle_restored`].
    Restore(PendingPing),
    /// Publish on the cluster bus (only after [`Hub::enable_cluster`]).
    Cluster(ClusterOut),
}

/// What the hub loads from the database at start.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// (realm, from type_key, to type_key, allow).
    pub acl: Vec<(u32, String, String, bool)>,
    /// (manufacturer:name, spec).
    pub specs: Vec<(String, ServiceSpec)>,
}

#[derive(Debug)]
struct Conn {
    bound: Option<ActrId>,
    wants_answer: bool,
    registering: bool,
    proto: Proto,
}

/// The signaling hub.
pub struct Hub {
    cfg: SignalingConfig,
    stats: Arc<SignalingStats>,
    new_id: Box<dyn FnMut() -> String + Send>,
    ais_available: bool,
    conns: HashMap<ConnId, Conn>,
    by_actor: HashMap<ActorKey, ConnId>,
    registry: BTreeMap<ActorKey, Entry>,
    acl: AclTable,
    specs: SpecTable,
    presence: Presence,
    out: VecDeque<Output>,
    /// Cross-node signaling on ([`Hub::enable_cluster`]).
    cluster: bool,
    /// The ACL each local actor registered with, to announce it again on a resync (kept only
    /// with the cluster on).
    acl_of: HashMap<ActorKey, Acl>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("conns", &self.conns.len())
            .field("registry", &self.registry.len())
            .finish_non_exhaustive()
    }
}

/// Unix seconds of a Unix millisecond time.
fn secs(now_unix_ms: u64) -> u64 {
    now_unix_ms / 1000
}

impl Hub {
    /// A hub with `loaded` state. `new_id` makes envelope ids (UUID v4 in production).
    pub fn new(
        cfg: SignalingConfig,
        stats: Arc<SignalingStats>,
        ais_available: bool,
        new_id: Box<dyn FnMut() -> String + Send>,
        loaded: Loaded,
    ) -> Self {
        let mut hub = Hub {
            cfg,
            stats,
            new_id,
            ais_available,
            conns: HashMap::new(),
            by_actor: HashMap::new(),
            registry: BTreeMap::new(),
            acl: AclTable::default(),
            specs: SpecTable::default(),
            presence: Presence::default(),
            out: VecDeque::new(),
            cluster: false,
            acl_of: HashMap::new(),
        };
        for (realm, from, to, allow) in loaded.acl {
            hub.acl.set(realm, from, to, allow);
        }
        for (base, spec) in loaded.specs {
            hub.specs.insert(base, spec);
        }
        hub
    }

    /// The next thing to do, if any.
    #[must_use = "every output must be carried out; drain until None"]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Registry entries in memory.
    pub fn registry_len(&self) -> usize {
        self.registry.len()
    }

    /// The identity bound to `conn`, if any.
    pub fn bound(&self, conn: ConnId) -> Option<&ActrId> {
        self.conns.get(&conn).and_then(|c| c.bound.as_ref())
    }

    // ----- entry points -----

    /// An envelope-level error with no `reply_for` (rate limit, malformed frame).
    pub fn envelope_error(&mut self, now_unix_ms: u64, conn: ConnId, code: u32, message: String) {
        self.stats.count_error(code);
        let env = self.envelope(
            now_unix_ms,
            None,
            signaling_envelope::Flow::EnvelopeError(ErrorResponse { code, message }),
        );
        self.send(conn, env);
    }

    /// A new connection. `identity` is the URL reconnect identity, already validated by the
    /// I/O layer (wire section 9.2); only then is any older connection bound to the same actor
    /// evicted.
    pub fn handle_connect(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        identity: Option<ActrId>,
        wants_answer: bool,
    ) {
        self.connect(now_unix_ms, conn, identity, wants_answer, Proto::V1);
    }

    /// A new connection of an actr 0.4 client. 0.4 actors register with the AIS over HTTP and
    /// then connect with their identity in the URL (validated by the I/O layer), so binding is
    /// what puts them in the registry: with `registration` (what they registered with) when
    /// the AIS still holds it, otherwise with their type alone; ActrUp goes to their
    /// subscribers as after a 0.1.7 registration. An actor already in memory (a reconnect)
    /// keeps its entry.
    pub fn handle_connect_v4(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        identity: Option<ActrId>,
        wants_answer: bool,
        registration: Option<Registration>,
    ) {
        self.connect(now_unix_ms, conn, identity.clone(), wants_answer, Proto::V4);
        let Some(id) = identity else { return };
        let key = ActorKey::of(&id);
        if let Some(e) = self.registry.get_mut(&key).filter(|e| e.remote.is_none()) {
            e.proto = Proto::V4;
            return;
        }
        let r = registration.unwrap_or_default();
        self.add_entry(
            now_unix_ms,
            &id,
            Proto::V4,
            r.spec,
            r.acl.as_ref(),
            r.ws_address,
        );
        stats::inc(&self.stats.registrations);
        let my_key = type_key(&id.r#type);
        self.announce(now_unix_ms, &id, &my_key);
        self.cluster_up(key, true);
    }

    /// The protocol of `conn` (0.1.7 for an unknown connection).
    pub fn proto(&self, conn: ConnId) -> Proto {
        self.conns.get(&conn).map(|c| c.proto).unwrap_or_default()
    }

    /// The protocol of the connection bound to `key`, if any.
    fn proto_of(&self, key: &ActorKey) -> Option<Proto> {
        self.by_actor
            .get(key)
            .and_then(|c| self.conns.get(c))
            .map(|c| c.proto)
    }

    fn connect(
        &mut self,
        _now_unix_ms: u64,
        conn: ConnId,
        identity: Option<ActrId>,
        wants_answer: bool,
        proto: Proto,
    ) {
        if let Some(id) = &identity {
            let key = ActorKey::of(id);
            if let Some(old) = self.by_actor.insert(key, conn) {
                if old != conn {
                    if let Some(c) = self.conns.get_mut(&old) {
                        // The evicted connection no longer speaks for the actor; its cleanup
                        // must not remove the registry entry the new connection keeps using.
                        c.bound = None;
                    }
                    self.out.push_back(Output::Close {
                        conn: old,
                        code: 4000,
                        reason: "replaced by a newer connection",
                    });
                }
            }
        }
        self.conns.insert(
            conn,
            Conn {
                bound: identity,
                wants_answer,
                registering: false,
                proto,
            },
        );
    }

    /// A connection ended (closed, failed, timed out, evicted). Removes its actor from memory
    /// and from the database (wire section 8.1), unless another connection took the actor over.
    pub fn handle_disconnect(&mut self, now_unix_ms: u64, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(id) = c.bound {
            let key = ActorKey::of(&id);
            if self.by_actor.get(&key) == Some(&conn) {
                self.by_actor.remove(&key);
                self.remove_actor(key);
                self.presence.departed(secs(now_unix_ms), key);
                self.cluster_down(key);
            }
        }
    }

    /// Periodic sweep: evict entries without a Ping for `heartbeat_timeout_secs` from memory
    /// (their rows stay, so a later Ping restores them), and drop the subscriptions of actors
    /// gone for as long.
    pub fn handle_timeout(&mut self, now_unix_ms: u64) {
        let now_unix = secs(now_unix_ms);
        let limit = self.cfg.heartbeat_timeout_secs;
        let before = self.registry.len();
        let mut evicted = Vec::new();
        // Remote entries are not swept: their node's heartbeat on the bus stands for them.
        self.registry.retain(|k, e| {
            let keep = e.remote.is_some() || now_unix.saturating_sub(e.last_heartbeat) <= limit;
            if !keep {
                evicted.push(*k);
            }
            keep
        });
        let by_actor = &self.by_actor;
        self.presence
            .sweep(now_unix, limit, |k| by_actor.contains_key(k));
        self.count_evictions(before - self.registry.len());
        for key in evicted {
            self.cluster_down(key);
        }
    }

    /// A decoded envelope from `conn`. `verdict` is the I/O layer's verdict on the envelope's
    /// credential (`None` when the flow carries none).
    pub fn handle_envelope(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        env: SignalingEnvelope,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let reply_for = env.envelope_id;
        match env.flow {
            Some(signaling_envelope::Flow::PeerToServer(p)) => match p.payload {
                Some(peer_to_signaling::Payload::RegisterRequest(req)) => {
                    self.on_register(now_unix_ms, conn, reply_for, req, realms)
                }
                None => tracing::debug!("peer_to_server without payload ignored"),
            },
            Some(signaling_envelope::Flow::ActrToServer(a)) => {
                self.on_actr_to_server(now_unix_ms, conn, reply_for, a, verdict, realms)
            }
            Some(signaling_envelope::Flow::ActrRelay(r)) => {
                self.on_relay(now_unix_ms, conn, reply_for, r, verdict, realms)
            }
            Some(signaling_envelope::Flow::EnvelopeError(e)) => {
                tracing::debug!(code = e.code, "client envelope_error");
            }
            Some(signaling_envelope::Flow::ServerToActr(_)) | None => {}
        }
    }

    /// Refuse the request `reply_for` of `conn` with `SignalingToActr.error {code, message}`
    /// to `target` (for refusals the I/O layer decides, such as a credential of the other
    /// protocol on this connection).
    pub fn refuse(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: &str,
        target: ActrId,
        code: u32,
        message: String,
    ) {
        if self.conns.contains_key(&conn) {
            self.error_to_actr(now_unix_ms, conn, reply_for, target, code, message);
        }
    }

    /// The checks every authenticated request passes (realm, credential, credential names
    /// `source`, connection bound to `source`), for a request the I/O layer answers itself
    /// (0.4's `GetSigningKeyRequest`). On failure the error is queued and `false` returned.
    pub fn authenticate_request(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: &str,
        source: &ActrId,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
    ) -> bool {
        self.conns.contains_key(&conn)
            && self
                .authenticate(now_unix_ms, conn, reply_for, source, verdict, Some(realms))
                .is_some()
    }

    /// The AIS answered a registration (steps 5-7 of wire section 8.3).
    pub fn handle_register_result(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        req: RegisterRequest,
        result: Result<register_response::RegisterOk, String>,
    ) {
        self.finish_register(now_unix_ms, conn, reply_for, req, result);
    }

    /// The database answered a restore: re-insert the entry (when found and the connection
    /// still speaks for the actor) and answer the Ping.
    pub fn handle_restored(
        &mut self,
        now_unix_ms: u64,
        pending: PendingPing,
        row: Option<PersistedEntry>,
    ) {
        self.finish_restore(now_unix_ms, pending, row);
    }

    /// The AIS (or the I/O layer re-issuing for the same ActrId, wire section 9.8) answered a
    /// credential update.
    pub fn handle_refresh_result(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        result: Result<register_response::RegisterOk, String>,
    ) {
        self.finish_refresh(now_unix_ms, conn, reply_for, source, result);
    }

    // ----- envelopes -----

    fn envelope(
        &mut self,
        now_unix_ms: u64,
        reply_for: Option<String>,
        flow: signaling_envelope::Flow,
    ) -> SignalingEnvelope {
        SignalingEnvelope {
            envelope_version: 1,
            envelope_id: (self.new_id)(),
            reply_for,
            timestamp: Timestamp {
                seconds: i64::try_from(secs(now_unix_ms)).unwrap_or(i64::MAX),
                nanos: 0,
            },
            traceparent: None,
            tracestate: None,
            flow: Some(flow),
        }
    }

    fn send(&mut self, conn: ConnId, envelope: SignalingEnvelope) {
        self.out.push_back(Output::Send { conn, envelope });
    }

    fn send_to_actr(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: Option<String>,
        target: ActrId,
        payload: signaling_to_actr::Payload,
    ) {
        let env = self.envelope(
            now_unix_ms,
            reply_for,
            signaling_envelope::Flow::ServerToActr(SignalingToActr {
                target,
                payload: Some(payload),
            }),
        );
        self.send(conn, env);
    }

    /// The answer to the request `reply_for`.
    fn reply(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        target: ActrId,
        payload: signaling_to_actr::Payload,
    ) {
        self.send_to_actr(now_unix_ms, conn, Some(reply_for), target, payload);
    }

    fn error_to_actr(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: &str,
        target: ActrId,
        code: u32,
        message: String,
    ) {
        self.stats.count_error(code);
        self.reply(
            now_unix_ms,
            conn,
            reply_for.to_owned(),
            target,
            signaling_to_actr::Payload::Error(ErrorResponse { code, message }),
        );
    }

    // ----- authenticated requests -----

    /// Wire sections 8.3 (second row) and 9.1: realm (unless the caller checked it already and
    /// passes no `realms`), credential, credential names source, connection bound to source.
    /// On failure the error has been queued and `None` returned.
    #[must_use = "None means the request was refused and must go no further"]
    fn authenticate(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: &str,
        source: &ActrId,
        verdict: Option<CredentialVerdict>,
        realms: Option<&mut dyn RealmCheck>,
    ) -> Option<Arc<VerifiedCredential>> {
        match self.check_credential(now_unix_ms, conn, source, verdict, realms) {
            Ok(cred) => Some(cred),
            Err((code, message)) => {
                self.error_to_actr(now_unix_ms, conn, reply_for, source.clone(), code, message);
                None
            }
        }
    }

    /// The checks of [`Hub::authenticate`] in their order: the credential, or the error code
    /// and message of the first check that fails.
    fn check_credential(
        &self,
        now_unix_ms: u64,
        conn: ConnId,
        source: &ActrId,
        verdict: Option<CredentialVerdict>,
        realms: Option<&mut dyn RealmCheck>,
    ) -> Result<Arc<VerifiedCredential>, (u32, String)> {
        if let Some(realms) = realms {
            realms
                .check_realm(now_unix_ms, source.realm.realm_id)
                .map_err(|e| (403, format!("Realm validation failed: {e}")))?;
        }
        let now_unix = secs(now_unix_ms);
        let cred = match verdict {
            Some(CredentialVerdict::Valid(c)) => {
                if now_unix > c.expr_time {
                    Err("credential expired".to_owned())
                } else if c.realm_id != source.realm.realm_id {
                    Err("realm mismatch".to_owned())
                } else {
                    Ok(c)
                }
            }
            Some(CredentialVerdict::Invalid(e)) => Err(e),
            None => Err("no credential".to_owned()),
        }
        .map_err(|e| (401, format!("Credential validation failed: {e}")))?;
        if cred.actor_id != actr_id_string(source) {
            return Err((
                403,
                "Source identity mismatch: source does not match credential".into(),
            ));
        }
        let bound_ok = self
            .conns
            .get(&conn)
            .and_then(|c| c.bound.as_ref())
            .is_some_and(|b| ActorKey::of(b) == ActorKey::of(source));
        if !bound_ok {
            return Err((
                403,
                "Source identity mismatch: connection is not bound to source".into(),
            ));
        }
        Ok(cred)
    }

    /// An `actr_to_server` envelope: authenticate, then hand the payload to its concern.
    fn on_actr_to_server(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        a: ActrToSignaling,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
    ) {
        let source = a.source;
        let Some(cred) = self.authenticate(
            now_unix_ms,
            conn,
            &reply_for,
            &source,
            verdict,
            Some(realms),
        ) else {
            return;
        };
        use actr_to_signaling::Payload as P;
        match a.payload {
            Some(P::Ping(ping)) => {
                let in_tolerance = cred.key_in_tolerance(secs(now_unix_ms));
                let ping = PendingPing {
                    conn,
                    reply_for,
                    source,
                    ping,
                    in_tolerance,
                };
                self.on_ping(now_unix_ms, ping)
            }
            Some(P::UnregisterRequest(u)) => {
                self.on_unregister(now_unix_ms, conn, reply_for, source, u)
            }
            Some(P::CredentialUpdateRequest(r)) => {
                self.on_credential_update(now_unix_ms, conn, reply_for, source, r)
            }
            Some(P::DiscoveryRequest(d)) => {
                self.on_discovery(now_unix_ms, conn, reply_for, source, d)
            }
            Some(P::RouteCandidatesRequest(r)) => {
                self.on_route_candidates(now_unix_ms, conn, reply_for, source, r)
            }
            Some(P::GetServiceSpecRequest(g)) => {
                self.on_get_service_spec(now_unix_ms, conn, reply_for, source, g)
            }
            Some(P::SubscribeActrUpRequest(s)) => {
                self.on_subscribe(now_unix_ms, conn, reply_for, source, s)
            }
            Some(P::UnsubscribeActrUpRequest(s)) => {
                self.on_unsubscribe(now_unix_ms, conn, reply_for, source, s)
            }
            Some(P::Error(e)) => {
                tracing::debug!(code = e.code, message = %e.message, "client error report");
            }
            None => {}
        }
    }
}
