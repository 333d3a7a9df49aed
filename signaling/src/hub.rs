//! The sans-IO signaling core: a state machine fed connection events, decoded envelopes (with
//! the verdict on their credential) and the time, that queues what to send where.
//!
//! Run-loop contract: after every `handle_*` call, drain [`Hub::poll_output`] until it returns
//! `None`. The hub owns no socket, reads no clock and touches no disk: realm validity comes
//! through [`RealmCheck`], credentials are verified by the I/O layer before the envelope is
//! handed in ([`CredentialVerdict`]), AIS calls, persistence and registry restores are
//! [`Output`]s whose results come back through `handle_register_result`,
//! `handle_refresh_result` and `handle_restored`.
//!
//! Architecture invariants:
//! - Nothing routes across realms: every lookup is keyed by the source's realm.
//! - Every `actr_to_server` and `actr_relay` envelope is refused unless its credential decrypts,
//!   is unexpired, names `source` (`claims.actor_id`) and the connection is bound to `source`
//!   (wire section 9.1).
//! - Forwarded relays and RoleAssignments carry an empty credential (wire section 9.3).
//! - Iteration order never depends on a hash map: the registry is a `BTreeMap`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::config::SignalingConfig;
use crate::proto::*;
use crate::stats::{self, SignalingStats};

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
    /// Wire section 5.4: `expires_at ≠ 0 && expires_at < now ≤ expires_at + tolerance`.
    pub fn key_in_tolerance(&self, now: u64) -> bool {
        self.key_expires_at != 0
            && self.key_expires_at < now
            && now <= self.key_expires_at.saturating_add(self.key_tolerance)
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
    /// `Ok` when the realm exists, is Normal and not expired at `now_ms`.
    fn check_realm(&mut self, realm_id: u32, now_ms: u64) -> Result<(), String>;
}

/// A registry row to persist or restore.
#[derive(Clone, Debug, PartialEq)]
pub struct PersistedEntry {
    pub actr_id: ActrId,
    pub service_name: String,
    pub spec: Option<ServiceSpec>,
    pub ws_address: Option<String>,
    pub availability: Option<i32>,
    pub power_reserve: Option<f32>,
    pub mailbox_backlog: Option<f32>,
    /// Unix seconds after which the row is purged.
    pub expires_at: u64,
}

/// A persistence operation for the I/O layer's database writer.
#[derive(Clone, Debug, PartialEq)]
pub enum PersistOp {
    UpsertEntry(PersistedEntry),
    /// Refresh the TTL and the load of a row (Ping).
    TouchEntry {
        key: ActorKey,
        expires_at: u64,
        availability: i32,
        power_reserve: f32,
        mailbox_backlog: f32,
    },
    DeleteEntry(ActorKey),
    /// Insert or overwrite an ACL row (last write wins, wire section 9.9).
    UpsertAcl {
        realm: u32,
        from: String,
        to: String,
        allow: bool,
    },
    /// Keep a spec for compatibility analysis, keyed by `manufacturer:name` and fingerprint.
    UpsertSpec {
        type_base: String,
        spec: ServiceSpec,
        stored_at: u64,
    },
}

/// An AIS call the I/O layer runs on the blocking pool.
#[derive(Clone, Debug, PartialEq)]
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

/// A Ping whose actor must first be restored from the database.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingPing {
    pub conn: ConnId,
    pub reply_for: String,
    pub source: ActrId,
    pub ping: Ping,
    pub in_tolerance: bool,
}

/// What the hub wants done.
#[derive(Clone, Debug, PartialEq)]
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
}

#[derive(Debug)]
struct Conn {
    bound: Option<ActrId>,
    wants_answer: bool,
    registering: bool,
}

#[derive(Clone, Debug)]
struct Entry {
    actr_id: ActrId,
    type_key: String,
    service_name: String,
    spec: Option<ServiceSpec>,
    ws_address: Option<String>,
    availability: Option<i32>,
    power_reserve: Option<f32>,
    mailbox_backlog: Option<f32>,
    last_heartbeat: u64,
}

impl Entry {
    fn persisted(&self, expires_at: u64) -> PersistedEntry {
        PersistedEntry {
            actr_id: self.actr_id.clone(),
            service_name: self.service_name.clone(),
            spec: self.spec.clone(),
            ws_address: self.ws_address.clone(),
            availability: self.availability,
            power_reserve: self.power_reserve,
            mailbox_backlog: self.mailbox_backlog,
            expires_at,
        }
    }
}

/// Exact ActrType equality (the version's absence differs from any value), as a hashable key.
type TypeExact = (String, String, Option<String>);

fn type_exact(t: &ActrType) -> TypeExact {
    (t.manufacturer.clone(), t.name.clone(), t.version.clone())
}

/// `manufacturer:name`, the key of stored specs.
pub fn type_base(t: &ActrType) -> String {
    format!("{}:{}", t.manufacturer, t.name)
}

/// What the hub loads from the database at start.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// (realm, from type_key, to type_key, allow).
    pub acl: Vec<(u32, String, String, bool)>,
    /// (manufacturer:name, spec).
    pub specs: Vec<(String, ServiceSpec)>,
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
    /// realm → from type_key → to type_key → allow.
    acl: HashMap<u32, HashMap<String, HashMap<String, bool>>>,
    /// (manufacturer:name, fingerprint) → spec.
    specs: HashMap<(String, String), ServiceSpec>,
    /// (base fingerprint, candidate fingerprint) → analysis.
    compat_cache: HashMap<(String, String), CompatibilityAnalysisResult>,
    subs_by_type: HashMap<TypeExact, BTreeMap<ActorKey, ActrId>>,
    subs_of: HashMap<ActorKey, Vec<TypeExact>>,
    /// Subscribers whose connection went away, with when (Unix seconds): their subscriptions
    /// are kept for a reconnect, and dropped by the sweep after `heartbeat_timeout_secs`.
    departed: HashMap<ActorKey, u64>,
    out: VecDeque<Output>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("conns", &self.conns.len())
            .field("registry", &self.registry.len())
            .finish_non_exhaustive()
    }
}

const PLACEHOLDER_TYPE: &str = "temp";
const MAX_COMPAT_CACHE: usize = 10_000;
const MAX_SPECS: usize = 100_000;
const TOLERANCE_WARNING: &str =
    "Your credential key is in tolerance period. Please update your credential soon.";

/// The target of register errors (wire section 8.3).
pub fn placeholder_id() -> ActrId {
    ActrId {
        realm: Realm { realm_id: 0 },
        serial_number: 0,
        r#type: ActrType {
            manufacturer: PLACEHOLDER_TYPE.into(),
            name: PLACEHOLDER_TYPE.into(),
            version: None,
        },
    }
}

fn empty_credential() -> AIdCredential {
    AIdCredential {
        encrypted_token: Vec::new(),
        token_key_id: 0,
    }
}

fn secs(now_ms: u64) -> u64 {
    now_ms / 1000
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
            acl: HashMap::new(),
            specs: HashMap::new(),
            compat_cache: HashMap::new(),
            subs_by_type: HashMap::new(),
            subs_of: HashMap::new(),
            departed: HashMap::new(),
            out: VecDeque::new(),
        };
        for (realm, from, to, allow) in loaded.acl {
            hub.set_acl(realm, from, to, allow);
        }
        for (base, spec) in loaded.specs {
            hub.specs.insert((base, spec.fingerprint.clone()), spec);
        }
        hub
    }

    /// The next thing to do, if any.
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

    fn set_acl(&mut self, realm: u32, from: String, to: String, allow: bool) {
        self.acl
            .entry(realm)
            .or_default()
            .entry(from)
            .or_default()
            .insert(to, allow);
    }

    /// Default deny: only an explicit ALLOW row (realm, from, to) permits (wire section 8.6).
    pub fn acl_allows(&self, realm: u32, from: &str, to: &str) -> bool {
        self.acl
            .get(&realm)
            .and_then(|m| m.get(from))
            .and_then(|m| m.get(to))
            .copied()
            .unwrap_or(false)
    }

    fn envelope(
        &mut self,
        now_ms: u64,
        reply_for: Option<String>,
        flow: signaling_envelope::Flow,
    ) -> SignalingEnvelope {
        SignalingEnvelope {
            envelope_version: 1,
            envelope_id: (self.new_id)(),
            reply_for,
            timestamp: Timestamp {
                seconds: i64::try_from(secs(now_ms)).unwrap_or(i64::MAX),
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
        conn: ConnId,
        now_ms: u64,
        reply_for: Option<String>,
        target: ActrId,
        payload: signaling_to_actr::Payload,
    ) {
        let env = self.envelope(
            now_ms,
            reply_for,
            signaling_envelope::Flow::ServerToActr(SignalingToActr {
                target,
                payload: Some(payload),
            }),
        );
        self.send(conn, env);
    }

    fn error_to_actr(
        &mut self,
        conn: ConnId,
        now_ms: u64,
        reply_for: &str,
        target: ActrId,
        code: u32,
        message: String,
    ) {
        self.stats.count_error(code);
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for.to_owned()),
            target,
            signaling_to_actr::Payload::Error(ErrorResponse { code, message }),
        );
    }

    fn register_error(&mut self, conn: ConnId, now_ms: u64, reply_for: &str, code: u32, m: String) {
        self.stats.count_error(code);
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for.to_owned()),
            placeholder_id(),
            signaling_to_actr::Payload::RegisterResponse(RegisterResponse::error(code, m)),
        );
    }

    /// An envelope-level error with no `reply_for` (rate limit, malformed frame).
    pub fn envelope_error(&mut self, conn: ConnId, code: u32, message: String, now_ms: u64) {
        self.stats.count_error(code);
        let env = self.envelope(
            now_ms,
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
        conn: ConnId,
        identity: Option<ActrId>,
        wants_answer: bool,
        _now_ms: u64,
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
            },
        );
    }

    /// A connection ended (closed, failed, timed out, evicted). Removes its actor from memory
    /// and from the database (wire section 8.1), unless another connection took the actor over.
    pub fn handle_disconnect(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(id) = c.bound {
            let key = ActorKey::of(&id);
            if self.by_actor.get(&key) == Some(&conn) {
                self.by_actor.remove(&key);
                self.remove_actor(key);
                if self.subs_of.contains_key(&key) {
                    self.departed.insert(key, secs(now_ms));
                }
            }
        }
    }

    fn remove_actor(&mut self, key: ActorKey) {
        if self.registry.remove(&key).is_some() {
            stats::dec(&self.stats.registry_entries);
        }
        self.out
            .push_back(Output::Persist(PersistOp::DeleteEntry(key)));
    }

    /// Remove every ActrUp subscription `key` holds.
    fn drop_subscriptions(&mut self, key: ActorKey) {
        self.departed.remove(&key);
        if let Some(types) = self.subs_of.remove(&key) {
            for t in types {
                if let Some(m) = self.subs_by_type.get_mut(&t) {
                    m.remove(&key);
                    if m.is_empty() {
                        self.subs_by_type.remove(&t);
                    }
                }
            }
        }
    }

    /// The number of actors holding ActrUp subscriptions (they survive a disconnect for
    /// `heartbeat_timeout_secs`, and end with unregister).
    pub fn subscribers(&self) -> usize {
        self.subs_of.len()
    }

    /// Periodic sweep: evict entries without a Ping for `heartbeat_timeout_secs` from memory
    /// (their rows stay, so a later Ping restores them), and drop the subscriptions of actors
    /// gone for as long.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let now = secs(now_ms);
        let limit = self.cfg.heartbeat_timeout_secs;
        let before = self.registry.len();
        self.registry
            .retain(|_, e| now.saturating_sub(e.last_heartbeat) <= limit);
        // Subscriptions survive a disconnect for a reconnect, but not forever: an actor that
        // left without unregistering would otherwise hold up to `max_subscriptions_per_actor`
        // entries for good. Back on a connection, it keeps them.
        let by_actor = &self.by_actor;
        let mut expired = Vec::new();
        self.departed.retain(|k, since| {
            if by_actor.contains_key(k) {
                return false;
            }
            let keep = now.saturating_sub(*since) <= limit;
            if !keep {
                expired.push(*k);
            }
            keep
        });
        for key in expired {
            self.drop_subscriptions(key);
        }
        let evicted = (before - self.registry.len()) as u64;

        if evicted > 0 {
            self.stats
                .registry_evictions
                .fetch_add(evicted, std::sync::atomic::Ordering::Relaxed);
            self.stats
                .registry_entries
                .fetch_sub(evicted, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A decoded envelope from `conn`. `verdict` is the I/O layer's verdict on the envelope's
    /// credential (`None` when the flow carries none).
    pub fn handle_envelope(
        &mut self,
        conn: ConnId,
        env: SignalingEnvelope,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
        now_ms: u64,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let reply_for = env.envelope_id;
        match env.flow {
            Some(signaling_envelope::Flow::PeerToServer(p)) => match p.payload {
                Some(peer_to_signaling::Payload::RegisterRequest(req)) => {
                    self.on_register(conn, reply_for, req, realms, now_ms)
                }
                None => tracing::debug!("peer_to_server without payload ignored"),
            },
            Some(signaling_envelope::Flow::ActrToServer(a)) => {
                self.on_actr_to_server(conn, reply_for, a, verdict, realms, now_ms)
            }
            Some(signaling_envelope::Flow::ActrRelay(r)) => {
                self.on_relay(conn, reply_for, r, verdict, realms, now_ms)
            }
            Some(signaling_envelope::Flow::EnvelopeError(e)) => {
                tracing::debug!(code = e.code, "client envelope_error");
            }
            Some(signaling_envelope::Flow::ServerToActr(_)) | None => {}
        }
    }

    // ----- registration (wire section 8.3, first row) -----

    fn on_register(
        &mut self,
        conn: ConnId,
        reply_for: String,
        req: RegisterRequest,
        realms: &mut dyn RealmCheck,
        now_ms: u64,
    ) {
        // 1. Realm valid.
        if let Err(e) = realms.check_realm(req.realm.realm_id, now_ms) {
            return self.register_error(
                conn,
                now_ms,
                &reply_for,
                403,
                format!("Realm validation failed: {e}"),
            );
        }
        // 2. Already registered (earlier register, pending register, or URL identity).
        let already = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.bound.is_some() || c.registering);
        if already {
            return self.register_error(conn, now_ms, &reply_for, 409, "Already registered".into());
        }
        // Wire section 9.10: only types whose ActrId string parses back.
        let t = &req.actr_type;
        if !name_rule(&t.manufacturer) || !name_rule(&t.name) {
            return self.register_error(
                conn,
                now_ms,
                &reply_for,
                400,
                "Invalid actor type: manufacturer and name must follow the Name rule".into(),
            );
        }
        if t.version.as_deref().is_some_and(|v| v.contains(':')) {
            return self.register_error(
                conn,
                now_ms,
                &reply_for,
                400,
                "Invalid actor type: version must not contain ':'".into(),
            );
        }
        // 3. AIS configured.
        if !self.ais_available {
            return self.register_error(
                conn,
                now_ms,
                &reply_for,
                500,
                "AIS not configured; registration is unavailable".into(),
            );
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.registering = true;
        }
        // 4. Call AIS (the I/O layer does it on the blocking pool).
        self.out.push_back(Output::Ais(AisCall::Register {
            conn,
            reply_for,
            request: req,
        }));
    }

    /// The AIS answered a registration (steps 5-7 of wire section 8.3).
    pub fn handle_register_result(
        &mut self,
        conn: ConnId,
        reply_for: String,
        req: RegisterRequest,
        result: Result<register_response::RegisterOk, String>,
        now_ms: u64,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.registering = false;
        let ok = match result {
            Ok(ok) => ok,
            Err(e) => {
                return self.register_error(
                    conn,
                    now_ms,
                    &reply_for,
                    500,
                    format!("Failed to call AIS: {e}"),
                )
            }
        };
        let now = secs(now_ms);
        let id = ok.actr_id.clone();
        let key = ActorKey::of(&id);
        let my_key = type_key(&id.r#type);
        // 5. Registry, ACL, binding.
        let service_name = match &req.service_spec {
            Some(s) => s.name.clone(),
            None => format!("{}/{}", id.r#type.manufacturer, id.r#type.name),
        };
        let entry = Entry {
            actr_id: id.clone(),
            type_key: my_key.clone(),
            service_name,
            spec: req.service_spec.clone(),
            ws_address: req.ws_address.clone(),
            availability: None,
            power_reserve: None,
            mailbox_backlog: None,
            last_heartbeat: now,
        };
        self.out.push_back(Output::Persist(PersistOp::UpsertEntry(
            entry.persisted(now.saturating_add(self.cfg.persist_ttl_secs)),
        )));
        if self.registry.insert(key, entry).is_none() {
            stats::inc(&self.stats.registry_entries);
        }
        if let Some(spec) = &req.service_spec {
            self.store_spec(type_base(&id.r#type), spec.clone(), now);
        }
        if let Some(acl) = &req.acl {
            for rule in &acl.rules {
                let allow = rule.permission == acl_rule::ALLOW;
                for p in &rule.principals {
                    let Some(from) = &p.actr_type else { continue };
                    let from = type_key(from);
                    self.set_acl(id.realm.realm_id, from.clone(), my_key.clone(), allow);
                    self.out.push_back(Output::Persist(PersistOp::UpsertAcl {
                        realm: id.realm.realm_id,
                        from,
                        to: my_key.clone(),
                        allow,
                    }));
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.bound = Some(id.clone());
        }
        if let Some(old) = self.by_actor.insert(key, conn) {
            if old != conn {
                if let Some(c) = self.conns.get_mut(&old) {
                    c.bound = None;
                }
            }
        }
        stats::inc(&self.stats.registrations);
        // 6. Reply.
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for),
            id.clone(),
            signaling_to_actr::Payload::RegisterResponse(RegisterResponse {
                result: Some(register_response::Result::Success(ok)),
            }),
        );
        // 7. ActrUp to ACL-permitted subscribers of this exact type in the same realm.
        let subs: Vec<(ActorKey, ActrId)> = self
            .subs_by_type
            .get(&type_exact(&id.r#type))
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.realm == id.realm.realm_id && **k != key)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (sub_key, sub_id) in subs {
            if !self.acl_allows(id.realm.realm_id, &type_key(&sub_id.r#type), &my_key) {
                continue;
            }
            let Some(&sub_conn) = self.by_actor.get(&sub_key) else {
                continue;
            };
            self.send_to_actr(
                sub_conn,
                now_ms,
                None,
                sub_id,
                signaling_to_actr::Payload::ActrUpEvent(ActrUpEvent {
                    actor_id: id.clone(),
                }),
            );
        }
    }

    fn store_spec(&mut self, base: String, spec: ServiceSpec, now: u64) {
        if self.specs.len() >= MAX_SPECS {
            return;
        }
        let k = (base.clone(), spec.fingerprint.clone());
        if self.specs.get(&k) != Some(&spec) {
            self.specs.insert(k, spec.clone());
        }
        self.out.push_back(Output::Persist(PersistOp::UpsertSpec {
            type_base: base,
            spec,
            stored_at: now,
        }));
    }

    // ----- authenticated requests -----

    /// Wire sections 8.3 (second row) and 9.1: realm, credential, credential names source,
    /// connection bound to source. On failure the error has been queued and `None` returned.
    #[allow(clippy::too_many_arguments)]
    fn authenticate(
        &mut self,
        conn: ConnId,
        reply_for: &str,
        source: &ActrId,
        verdict: Option<CredentialVerdict>,
        now_ms: u64,
        skip_realm: bool,
        realms: &mut dyn RealmCheck,
    ) -> Option<Arc<VerifiedCredential>> {
        if !skip_realm {
            if let Err(e) = realms.check_realm(source.realm.realm_id, now_ms) {
                self.error_to_actr(
                    conn,
                    now_ms,
                    reply_for,
                    source.clone(),
                    403,
                    format!("Realm validation failed: {e}"),
                );
                return None;
            }
        }
        let now = secs(now_ms);
        let cred = match verdict {
            Some(CredentialVerdict::Valid(c)) => {
                if now > c.expr_time {
                    Err("credential expired".to_owned())
                } else if c.realm_id != source.realm.realm_id {
                    Err("realm mismatch".to_owned())
                } else {
                    Ok(c)
                }
            }
            Some(CredentialVerdict::Invalid(e)) => Err(e),
            None => Err("no credential".to_owned()),
        };
        let cred = match cred {
            Ok(c) => c,
            Err(e) => {
                self.error_to_actr(
                    conn,
                    now_ms,
                    reply_for,
                    source.clone(),
                    401,
                    format!("Credential validation failed: {e}"),
                );
                return None;
            }
        };
        if cred.actor_id != actr_id_string(source) {
            self.error_to_actr(
                conn,
                now_ms,
                reply_for,
                source.clone(),
                403,
                "Source identity mismatch: source does not match credential".into(),
            );
            return None;
        }
        let bound_ok = self
            .conns
            .get(&conn)
            .and_then(|c| c.bound.as_ref())
            .is_some_and(|b| ActorKey::of(b) == ActorKey::of(source));
        if !bound_ok {
            self.error_to_actr(
                conn,
                now_ms,
                reply_for,
                source.clone(),
                403,
                "Source identity mismatch: connection is not bound to source".into(),
            );
            return None;
        }
        Some(cred)
    }

    fn on_actr_to_server(
        &mut self,
        conn: ConnId,
        reply_for: String,
        a: ActrToSignaling,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
        now_ms: u64,
    ) {
        let source = a.source;
        let Some(cred) =
            self.authenticate(conn, &reply_for, &source, verdict, now_ms, false, realms)
        else {
            return;
        };
        use actr_to_signaling::Payload as P;
        match a.payload {
            Some(P::Ping(p)) => {
                let in_tol = cred.key_in_tolerance(secs(now_ms));
                self.on_ping(conn, reply_for, source, p, in_tol, now_ms)
            }
            Some(P::UnregisterRequest(u)) => {
                tracing::debug!(reason = ?u.reason, "unregister");
                self.send_to_actr(
                    conn,
                    now_ms,
                    Some(reply_for),
                    source.clone(),
                    signaling_to_actr::Payload::UnregisterResponse(UnregisterResponse {
                        result: Some(EmptyResult::Success(Empty {})),
                    }),
                );
                let key = ActorKey::of(&source);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.bound = None;
                }
                if self.by_actor.get(&key) == Some(&conn) {
                    self.by_actor.remove(&key);
                }
                self.remove_actor(key);
                self.drop_subscriptions(key);
            }

            Some(P::CredentialUpdateRequest(r)) => {
                if r.actr_id != source {
                    return;
                }
                if !self.ais_available {
                    return self.error_to_actr(
                        conn,
                        now_ms,
                        &reply_for,
                        source,
                        503,
                        "AIS service not configured".into(),
                    );
                }
                self.out.push_back(Output::Ais(AisCall::Refresh {
                    conn,
                    reply_for,
                    source,
                }));
            }
            Some(P::DiscoveryRequest(d)) => self.on_discovery(conn, reply_for, source, d, now_ms),
            Some(P::RouteCandidatesRequest(r)) => {
                self.on_route_candidates(conn, reply_for, source, r, now_ms)
            }
            Some(P::GetServiceSpecRequest(g)) => {
                let spec = self
                    .registry
                    .values()
                    .find(|e| {
                        e.actr_id.realm.realm_id == source.realm.realm_id
                            && e.service_name == g.name
                    })
                    .and_then(|e| e.spec.clone());
                let result = match spec {
                    Some(s) => get_service_spec_response::Result::Success(s),
                    None => {
                        self.stats.count_error(404);
                        get_service_spec_response::Result::Error(ErrorResponse {
                            code: 404,
                            message: format!("Service specification not found for name={}", g.name),
                        })
                    }
                };
                self.send_to_actr(
                    conn,
                    now_ms,
                    Some(reply_for),
                    source,
                    signaling_to_actr::Payload::GetServiceSpecResponse(GetServiceSpecResponse {
                        result: Some(result),
                    }),
                );
            }
            Some(P::SubscribeActrUpRequest(s)) => {
                let key = ActorKey::of(&source);
                let t = type_exact(&s.target_type);
                let list = self.subs_of.entry(key).or_default();
                let result = if list.contains(&t) {
                    EmptyResult::Success(Empty {})
                } else if list.len() >= self.cfg.max_subscriptions_per_actor {
                    self.stats.count_error(429);
                    EmptyResult::Error(ErrorResponse {
                        code: 429,
                        message: "Too many subscriptions".into(),
                    })
                } else {
                    list.push(t.clone());
                    self.subs_by_type
                        .entry(t)
                        .or_default()
                        .insert(key, source.clone());
                    EmptyResult::Success(Empty {})
                };
                self.send_to_actr(
                    conn,
                    now_ms,
                    Some(reply_for),
                    source,
                    signaling_to_actr::Payload::SubscribeActrUpResponse(SubscribeActrUpResponse {
                        result: Some(result),
                    }),
                );
            }
            Some(P::UnsubscribeActrUpRequest(s)) => {
                let key = ActorKey::of(&source);
                let t = type_exact(&s.target_type);
                if let Some(list) = self.subs_of.get_mut(&key) {
                    list.retain(|x| x != &t);
                    if list.is_empty() {
                        self.subs_of.remove(&key);
                    }
                }
                if let Some(m) = self.subs_by_type.get_mut(&t) {
                    m.remove(&key);
                    if m.is_empty() {
                        self.subs_by_type.remove(&t);
                    }
                }
                self.send_to_actr(
                    conn,
                    now_ms,
                    Some(reply_for),
                    source,
                    signaling_to_actr::Payload::UnsubscribeActrUpResponse(
                        UnsubscribeActrUpResponse {
                            result: Some(EmptyResult::Success(Empty {})),
                        },
                    ),
                );
            }
            Some(P::Error(e)) => {
                tracing::debug!(code = e.code, message = %e.message, "client error report");
            }
            None => {}
        }
    }

    fn on_ping(
        &mut self,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        ping: Ping,
        in_tolerance: bool,
        now_ms: u64,
    ) {
        let key = ActorKey::of(&source);
        if !self.registry.contains_key(&key) {
            // Restore from the persisted rows first (wire section 8.3, ping row).
            self.out.push_back(Output::Restore(PendingPing {
                conn,
                reply_for,
                source,
                ping,
                in_tolerance,
            }));
            return;
        }
        self.finish_ping(conn, reply_for, source, ping, in_tolerance, now_ms);
    }

    fn finish_ping(
        &mut self,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        ping: Ping,
        in_tolerance: bool,
        now_ms: u64,
    ) {
        let now = secs(now_ms);
        let key = ActorKey::of(&source);
        if let Some(e) = self.registry.get_mut(&key) {
            e.availability = Some(ping.availability);
            e.power_reserve = Some(ping.power_reserve);
            e.mailbox_backlog = Some(ping.mailbox_backlog);
            e.last_heartbeat = now;
            self.out.push_back(Output::Persist(PersistOp::TouchEntry {
                key,
                expires_at: now.saturating_add(self.cfg.persist_ttl_secs),
                availability: ping.availability,
                power_reserve: ping.power_reserve,
                mailbox_backlog: ping.mailbox_backlog,
            }));
        }
        let pong = Pong {
            seq: now,
            suggest_interval_secs: Some(self.cfg.suggest_ping_interval_secs),
            credential_warning: in_tolerance.then(|| CredentialWarning {
                r#type: 0,
                message: TOLERANCE_WARNING.into(),
            }),
        };
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for),
            source,
            signaling_to_actr::Payload::Pong(pong),
        );
    }

    /// The database answered a restore: re-insert the entry (when found and the connection
    /// still speaks for the actor) and answer the Ping.
    pub fn handle_restored(
        &mut self,
        pending: PendingPing,
        row: Option<PersistedEntry>,
        now_ms: u64,
    ) {
        let PendingPing {
            conn,
            reply_for,
            source,
            ping,
            in_tolerance,
        } = pending;
        let key = ActorKey::of(&source);
        let still_bound = self.by_actor.get(&key) == Some(&conn);
        if !still_bound {
            return;
        }
        if let Some(row) = row {
            if ActorKey::of(&row.actr_id) == key && !self.registry.contains_key(&key) {
                let entry = Entry {
                    type_key: type_key(&row.actr_id.r#type),
                    actr_id: row.actr_id,
                    service_name: row.service_name,
                    spec: row.spec,
                    ws_address: row.ws_address,
                    availability: row.availability,
                    power_reserve: row.power_reserve,
                    mailbox_backlog: row.mailbox_backlog,
                    last_heartbeat: secs(now_ms),
                };
                self.registry.insert(key, entry);
                stats::inc(&self.stats.registry_entries);
                stats::inc(&self.stats.registry_restores);
            }
        }
        self.finish_ping(conn, reply_for, source, ping, in_tolerance, now_ms);
    }

    /// The AIS (or the I/O layer re-issuing for the same ActrId, wire section 9.8) answered a
    /// credential update.
    pub fn handle_refresh_result(
        &mut self,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        result: Result<register_response::RegisterOk, String>,
        now_ms: u64,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        match result {
            Ok(mut ok) => {
                ok.actr_id = source.clone();
                self.send_to_actr(
                    conn,
                    now_ms,
                    Some(reply_for),
                    source,
                    signaling_to_actr::Payload::RegisterResponse(RegisterResponse {
                        result: Some(register_response::Result::Success(ok)),
                    }),
                );
            }
            Err(e) => self.error_to_actr(
                conn,
                now_ms,
                &reply_for,
                source,
                500,
                format!("Failed to refresh credential: {e}"),
            ),
        }
    }

    // ----- discovery and routing -----

    fn on_discovery(
        &mut self,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        d: DiscoveryRequest,
        now_ms: u64,
    ) {
        let realm = source.realm.realm_id;
        let src_key = type_key(&source.r#type);
        let limit = d.limit.unwrap_or(64) as usize;
        let mut seen: Vec<&str> = Vec::new();
        let mut entries = Vec::new();
        let range = ActorKey { realm, serial: 0 }..=ActorKey {
            realm,
            serial: u64::MAX,
        };
        for e in self.registry.range(range).map(|(_, e)| e) {
            if entries.len() >= limit {
                break;
            }
            if let Some(m) = &d.manufacturer {
                if &e.actr_id.r#type.manufacturer != m {
                    continue;
                }
            }
            if seen.contains(&e.type_key.as_str()) {
                continue;
            }
            if !self.acl_allows(realm, &src_key, &e.type_key) {
                continue;
            }
            seen.push(&e.type_key);
            entries.push(discovery_response::TypeEntry {
                actr_type: e.actr_id.r#type.clone(),
                name: e.service_name.clone(),
                description: e.spec.as_ref().and_then(|s| s.description.clone()),
                service_fingerprint: e
                    .spec
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), |s| s.fingerprint.clone()),
                published_at: e.spec.as_ref().and_then(|s| s.published_at),
                tags: e.spec.as_ref().map(|s| s.tags.clone()).unwrap_or_default(),
            });
        }
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for),
            source,
            signaling_to_actr::Payload::DiscoveryResponse(DiscoveryResponse {
                result: Some(discovery_response::Result::Success(
                    discovery_response::DiscoveryOk { entries },
                )),
            }),
        );
    }

    fn on_route_candidates(
        &mut self,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        req: RouteCandidatesRequest,
        now_ms: u64,
    ) {
        let ok = self.route_candidates(&source, &req, now_ms);
        self.send_to_actr(
            conn,
            now_ms,
            Some(reply_for),
            source,
            signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse {
                result: Some(route_candidates_response::Result::Success(ok)),
            }),
        );
    }

    /// Wire section 8.4. The instance set is restricted to the caller's realm before the
    /// version is chosen, so instances of other realms cannot influence the answer.
    fn route_candidates(
        &mut self,
        source: &ActrId,
        req: &RouteCandidatesRequest,
        now_ms: u64,
    ) -> route_candidates_response::RouteCandidatesOk {
        let realm = source.realm.realm_id;
        let src_key = type_key(&source.r#type);
        let t = &req.target_type;
        let range = ActorKey { realm, serial: 0 }..=ActorKey {
            realm,
            serial: u64::MAX,
        };
        // 1. Instance set: same manufacturer and name; requested version or the greatest.
        let same_name: Vec<&Entry> = self
            .registry
            .range(range)
            .map(|(_, e)| e)
            .filter(|e| {
                e.actr_id.r#type.manufacturer == t.manufacturer && e.actr_id.r#type.name == t.name
            })
            .collect();
        let trimmed = |e: &Entry| {
            e.actr_id
                .r#type
                .version
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let wanted = t
            .version
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let version = match wanted {
            Some(v) => Some(v),
            None => same_name.iter().filter_map(|e| trimmed(e)).max(),
        };
        // 2. ACL filter.
        let instances: Vec<Entry> = same_name
            .into_iter()
            .filter(|e| trimmed(e) == version)
            .filter(|e| self.acl_allows(realm, &src_key, &e.type_key))
            .cloned()
            .collect();
        // 5. ws_address_map: every ACL-passing instance.
        let ws_address_map: Vec<WsAddressEntry> = instances
            .iter()
            .map(|e| WsAddressEntry {
                candidate_id: e.actr_id.clone(),
                ws_address: e.ws_address.clone(),
            })
            .collect();
        let fp = req.client_fingerprint.trim();
        if !fp.is_empty() {
            // 3. Negotiation mode.
            let client_spec = self.specs.get(&(type_base(t), fp.to_owned())).cloned();
            let mut infos = Vec::new();
            let mut exact = Vec::new();
            let mut compatible: Vec<(i32, ActrId)> = Vec::new();
            for e in &instances {
                let cand_fp = e
                    .spec
                    .as_ref()
                    .map(|s| s.fingerprint.clone())
                    .unwrap_or_default();
                if !cand_fp.is_empty() && cand_fp == fp {
                    exact.push(e.actr_id.clone());
                    infos.push(CandidateCompatibilityInfo {
                        candidate_id: e.actr_id.clone(),
                        candidate_fingerprint: cand_fp,
                        analysis_result: None,
                        is_exact_match: Some(true),
                        ws_address: e.ws_address.clone(),
                    });
                    continue;
                }
                let analysis = match (&client_spec, &e.spec) {
                    (Some(base), Some(cand)) => Some(self.compatibility(base, cand, now_ms)),
                    _ => None,
                };
                if let Some(a) = &analysis {
                    if a.level != compat_level::BREAKING_CHANGES {
                        compatible.push((a.level, e.actr_id.clone()));
                    }
                }
                infos.push(CandidateCompatibilityInfo {
                    candidate_id: e.actr_id.clone(),
                    candidate_fingerprint: cand_fp,
                    analysis_result: analysis,
                    is_exact_match: Some(false),
                    ws_address: e.ws_address.clone(),
                });
            }
            let has_exact = !exact.is_empty();
            let mut candidates = if has_exact {
                exact
            } else {
                compatible.sort_by_key(|(level, _)| *level);
                compatible.into_iter().map(|(_, id)| id).collect()
            };
            let sub_healthy = !has_exact && !candidates.is_empty();
            if let Some(c) = &req.criteria {
                candidates.truncate(c.candidate_count as usize);
            }
            return route_candidates_response::RouteCandidatesOk {
                candidates,
                compatibility_info: infos,
                has_exact_match: Some(has_exact),
                is_sub_healthy: Some(sub_healthy),
                ws_address_map,
            };
        }
        // 4. Plain mode.
        let Some(criteria) = &req.criteria else {
            return route_candidates_response::RouteCandidatesOk {
                candidates: instances.iter().map(|e| e.actr_id.clone()).collect(),
                compatibility_info: Vec::new(),
                has_exact_match: None,
                is_sub_healthy: None,
                ws_address_map,
            };
        };
        let mut ranked: Vec<&Entry> = instances
            .iter()
            .filter(
                |e| match (criteria.minimal_health_requirement, e.availability) {
                    (None, _) => true,
                    (Some(min), Some(a)) => a <= min,
                    (Some(min), None) => min >= availability::DEGRADED,
                },
            )
            // Dependency state is never reported, so it is unknown for every instance.
            .filter(|_| match criteria.minimal_dependency_requirement {
                None => true,
                Some(min) => min >= dependency::WARNING,
            })
            .collect();
        for factor in &criteria.ranking_factors {
            match *factor {
                ranking::MAXIMUM_POWER_RESERVE => ranked.sort_by(|a, b| {
                    cmp_known_first(a.power_reserve, b.power_reserve, |x, y| y.total_cmp(&x))
                }),
                ranking::MINIMUM_MAILBOX_BACKLOG => ranked.sort_by(|a, b| {
                    cmp_known_first(a.mailbox_backlog, b.mailbox_backlog, |x, y| x.total_cmp(&y))
                }),
                // Location, compatibility score and sticky ids are never populated (as in
                // Actrix): these factors keep the order.
                _ => {}
            }
        }
        ranked.truncate(criteria.candidate_count as usize);
        route_candidates_response::RouteCandidatesOk {
            candidates: ranked.iter().map(|e| e.actr_id.clone()).collect(),
            compatibility_info: Vec::new(),
            has_exact_match: None,
            is_sub_healthy: None,
            ws_address_map,
        }
    }

    fn compatibility(
        &mut self,
        base: &ServiceSpec,
        cand: &ServiceSpec,
        now_ms: u64,
    ) -> CompatibilityAnalysisResult {
        let k = (base.fingerprint.clone(), cand.fingerprint.clone());
        if let Some(r) = self.compat_cache.get(&k) {
            return r.clone();
        }
        let r = analyze_compatibility(base, cand, secs(now_ms));
        if self.compat_cache.len() >= MAX_COMPAT_CACHE {
            self.compat_cache.clear();
        }
        self.compat_cache.insert(k, r.clone());
        r
    }

    // ----- relay (wire sections 8.3 last rows, 8.5, 9.3) -----

    fn on_relay(
        &mut self,
        conn: ConnId,
        reply_for: String,
        relay: ActrRelay,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
        now_ms: u64,
    ) {
        let source = &relay.source;
        let realm = source.realm.realm_id;
        // 1. Realm valid.
        if let Err(e) = realms.check_realm(realm, now_ms) {
            return self.error_to_actr(
                conn,
                now_ms,
                &reply_for,
                source.clone(),
                403,
                format!("Realm validation failed: {e}"),
            );
        }
        // For role negotiation the parties come from the payload (wire section 8.5); the
        // requester must be one of them and both must be in its realm.
        let peer: ActrId = match &relay.payload {
            Some(actr_relay::Payload::RoleNegotiation(rn)) => {
                let sk = ActorKey::of(source);
                if ActorKey::of(&rn.from) == sk {
                    rn.to.clone()
                } else if ActorKey::of(&rn.to) == sk {
                    rn.from.clone()
                } else {
                    return self.error_to_actr(
                        conn,
                        now_ms,
                        &reply_for,
                        source.clone(),
                        403,
                        "Source identity mismatch: requester is not a party of the negotiation"
                            .into(),
                    );
                }
            }
            _ => relay.target.clone(),
        };
        // 2. Same realm.
        if peer.realm.realm_id != realm || relay.target.realm.realm_id != realm {
            return self.error_to_actr(
                conn,
                now_ms,
                &reply_for,
                source.clone(),
                403,
                "Cross-realm relay is not allowed".into(),
            );
        }
        // 3. ACL.
        if !self.acl_allows(realm, &type_key(&source.r#type), &type_key(&peer.r#type)) {
            return self.error_to_actr(
                conn,
                now_ms,
                &reply_for,
                source.clone(),
                403,
                "ACL policy denies relay to target actor".into(),
            );
        }
        // 4, 5 and 9.1: credential, credential names source, connection bound to source.
        let source = source.clone();
        if self
            .authenticate(conn, &reply_for, &source, verdict, now_ms, true, realms)
            .is_none()
        {
            return;
        }
        let ActrRelay {
            source,
            target,
            payload,
            ..
        } = relay;
        match payload {
            Some(actr_relay::Payload::RoleNegotiation(rn)) => {
                self.negotiate_roles(rn, now_ms);
            }
            payload => {
                let target_key = ActorKey::of(&target);
                let Some(&to_conn) = self.by_actor.get(&target_key) else {
                    stats::inc(&self.stats.relays_no_target);
                    return;
                };
                // Forward unchanged except the sender's bearer credential (wire section 9.3).
                let env = self.envelope(
                    now_ms,
                    None,
                    signaling_envelope::Flow::ActrRelay(ActrRelay {
                        source,
                        credential: empty_credential(),
                        target,
                        payload,
                    }),
                );
                stats::inc(&self.stats.envelopes_relayed);
                self.send(to_conn, env);
            }
        }
    }

    fn wants_answer(&self, id: &ActrId) -> bool {
        self.by_actor
            .get(&ActorKey::of(id))
            .and_then(|c| self.conns.get(c))
            .is_some_and(|c| c.wants_answer && c.bound.as_ref() == Some(id))
    }

    /// Wire section 8.5: offerer choice, and one RoleAssignment to each side with `from` and
    /// `to` copied byte-exact.
    fn negotiate_roles(&mut self, rn: RoleNegotiation, now_ms: u64) {
        let from_answer = self.wants_answer(&rn.from);
        let to_answer = self.wants_answer(&rn.to);
        let from_is_offerer = if from_answer != to_answer {
            to_answer
        } else {
            (
                rn.from.realm.realm_id,
                rn.from.serial_number,
                rn.from.r#type.manufacturer.as_bytes(),
                rn.from.r#type.name.as_bytes(),
            ) < (
                rn.to.realm.realm_id,
                rn.to.serial_number,
                rn.to.r#type.manufacturer.as_bytes(),
                rn.to.r#type.name.as_bytes(),
            )
        };
        let sides = [
            (ActorKey::of(&rn.from), from_is_offerer, to_answer),
            (ActorKey::of(&rn.to), !from_is_offerer, from_answer),
        ];
        for (key, is_offerer, remote_fixed) in sides {
            let Some(&c) = self.by_actor.get(&key) else {
                continue;
            };
            let env = self.envelope(
                now_ms,
                None,
                signaling_envelope::Flow::ActrRelay(ActrRelay {
                    source: rn.from.clone(),
                    credential: empty_credential(),
                    target: rn.to.clone(),
                    payload: Some(actr_relay::Payload::RoleAssignment(RoleAssignment {
                        is_offerer,
                        remote_fixed: Some(remote_fixed),
                    })),
                }),
            );
            self.send(c, env);
        }
    }
}

fn cmp_known_first(
    a: Option<f32>,
    b: Option<f32>,
    f: impl Fn(f32, f32) -> std::cmp::Ordering,
) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => f(x, y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Compatibility of a candidate's spec with the client's, decided per protobuf package from
/// the package fingerprints (a deliberately simple model, documented in the README):
/// a package of the client missing from the candidate, or present with another fingerprint,
/// is a breaking change; a package only the candidate has is a compatible addition. The level is
/// BREAKING_CHANGES if anything breaks, BACKWARD_COMPATIBLE if something was added, otherwise
/// FULLY_COMPATIBLE.
pub fn analyze_compatibility(
    base: &ServiceSpec,
    cand: &ServiceSpec,
    now: u64,
) -> CompatibilityAnalysisResult {
    let mut changes = Vec::new();
    for b in &base.protobufs {
        match cand.protobufs.iter().find(|c| c.package == b.package) {
            None => changes.push(ProtocolChange {
                change_type: "PACKAGE_REMOVED".into(),
                file_name: b.package.clone(),
                location: b.package.clone(),
                description: format!("package {} is missing from the candidate", b.package),
                is_breaking: true,
            }),
            Some(c) if c.fingerprint != b.fingerprint => changes.push(ProtocolChange {
                change_type: "PACKAGE_CHANGED".into(),
                file_name: b.package.clone(),
                location: b.package.clone(),
                description: format!(
                    "package {} fingerprint {} differs from {}",
                    b.package, c.fingerprint, b.fingerprint
                ),
                is_breaking: true,
            }),
            Some(_) => {}
        }
    }
    for c in &cand.protobufs {
        if !base.protobufs.iter().any(|b| b.package == c.package) {
            changes.push(ProtocolChange {
                change_type: "PACKAGE_ADDED".into(),
                file_name: c.package.clone(),
                location: c.package.clone(),
                description: format!("package {} was added", c.package),
                is_breaking: false,
            });
        }
    }
    let breaking_changes: Vec<ProtocolChange> =
        changes.iter().filter(|c| c.is_breaking).cloned().collect();
    let level = if !breaking_changes.is_empty() {
        compat_level::BREAKING_CHANGES
    } else if !changes.is_empty() {
        compat_level::BACKWARD_COMPATIBLE
    } else {
        compat_level::FULLY_COMPATIBLE
    };
    CompatibilityAnalysisResult {
        level,
        changes,
        breaking_changes,
        base_fingerprint: base.fingerprint.clone(),
        candidate_fingerprint: cand.fingerprint.clone(),
        analyzed_at: i64::try_from(now).unwrap_or(i64::MAX),
    }
}
