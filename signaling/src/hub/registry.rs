//! The registry of actors: registration (wire section 8.3, first row), unregistration, Ping
//! (heartbeat and load, with a restore from the database for an entry not in memory),
//! credential refresh, heartbeat eviction, and the persistence operations they emit
//! ([`PersistOp`]).
//!
//! What it does not decide: who may reach an entry (`acl.rs`), who hears about it
//! (`presence.rs`), how entries are searched and ranked (`discovery.rs`). Credentials are
//! checked before these handlers run (`Hub::authenticate`), except for registration, which
//! carries none.

use super::{secs, type_base, ActorKey, AisCall, ConnId, Hub, Output, Proto, RealmCheck};
use crate::proto::*;
use crate::stats;

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
#[must_use = "a write the I/O layer must hand to the database writer"]
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

/// A Ping to answer, with the connection it came on and the verdict on its credential's key;
/// as an [`Output::Restore`], one whose actor must first be restored from the database.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingPing {
    pub conn: ConnId,
    pub reply_for: String,
    pub source: ActrId,
    pub ping: Ping,
    pub in_tolerance: bool,
}

/// An actor in memory.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) actr_id: ActrId,
    pub(super) type_key: String,
    pub(super) service_name: String,
    pub(super) spec: Option<ServiceSpec>,
    pub(super) ws_address: Option<String>,
    pub(super) availability: Option<i32>,
    pub(super) power_reserve: Option<f32>,
    pub(super) mailbox_backlog: Option<f32>,
    /// Unix seconds of the registration or the last Ping.
    pub(super) last_heartbeat: u64,
    /// The protocol the actor speaks; searches and relays stay within one.
    pub(super) proto: Proto,
    /// The node holding the actor, when it is not this one.
    pub(super) remote: Option<super::cluster::Remote>,
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

const PLACEHOLDER_TYPE: &str = "temp";
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

impl Hub {
    fn register_error(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: &str,
        code: u32,
        m: String,
    ) {
        self.stats.count_error(code);
        self.reply(
            now_unix_ms,
            conn,
            reply_for.to_owned(),
            placeholder_id(),
            signaling_to_actr::Payload::RegisterResponse(crate::proto::register_error(code, m)),
        );
    }

    /// Steps 1-4 of a registration: the checks, then the AIS call.
    pub(super) fn on_register(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        req: RegisterRequest,
        realms: &mut dyn RealmCheck,
    ) {
        if let Err((code, message)) = self.check_registration(now_unix_ms, conn, &req, realms) {
            return self.register_error(now_unix_ms, conn, &reply_for, code, message);
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

    /// Steps 1-3 of a registration in their order: the code and message of the first check
    /// that fails.
    fn check_registration(
        &self,
        now_unix_ms: u64,
        conn: ConnId,
        req: &RegisterRequest,
        realms: &mut dyn RealmCheck,
    ) -> Result<(), (u32, String)> {
        // 1. Realm valid.
        realms
            .check_realm(now_unix_ms, req.realm.realm_id)
            .map_err(|e| (403, format!("Realm validation failed: {e}")))?;
        // 2. Already registered (earlier register, pending register, or URL identity).
        let already = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.bound.is_some() || c.registering);
        if already {
            return Err((409, "Already registered".into()));
        }
        // Wire section 9.10: only types whose ActrId string parses back.
        let t = &req.actr_type;
        if !name_rule(&t.manufacturer) || !name_rule(&t.name) {
            return Err((
                400,
                "Invalid actor type: manufacturer and name must follow the Name rule".into(),
            ));
        }
        if t.version.as_deref().is_some_and(|v| v.contains(':')) {
            return Err((
                400,
                "Invalid actor type: version must not contain ':'".into(),
            ));
        }
        // 3. AIS configured.
        if !self.ais_available {
            return Err((
                500,
                "AIS not configured; registration is unavailable".into(),
            ));
        }
        Ok(())
    }

    /// Steps 5-7 of a registration, once the AIS answered: registry, ACL and binding, the
    /// reply, and ActrUp to the subscribers.
    pub(super) fn finish_register(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        req: RegisterRequest,
        result: Result<register_response::RegisterOk, String>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.registering = false;
        let ok = match result {
            Ok(ok) => ok,
            Err(e) => {
                return self.register_error(
                    now_unix_ms,
                    conn,
                    &reply_for,
                    500,
                    format!("Failed to call AIS: {e}"),
                )
            }
        };
        let id = ok.actr_id.clone();
        let key = ActorKey::of(&id);
        let my_key = type_key(&id.r#type);
        // 5. Registry, ACL, binding.
        self.add_entry(
            now_unix_ms,
            &id,
            Proto::V1,
            req.service_spec.clone(),
            req.acl.as_ref(),
            req.ws_address.clone(),
        );
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
        self.cluster_up(key, true);
        // 6. Reply.
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            id.clone(),
            signaling_to_actr::Payload::RegisterResponse(RegisterResponse {
                result: Some(register_response::Result::Success(ok)),
            }),
        );
        // 7. ActrUp to ACL-permitted subscribers of this exact type in the same realm.
        self.announce(now_unix_ms, &id, &my_key);
    }

    /// Put a newly registered actor in memory and the database, with its spec and ACL.
    pub(super) fn add_entry(
        &mut self,
        now_unix_ms: u64,
        id: &ActrId,
        proto: Proto,
        spec: Option<ServiceSpec>,
        acl: Option<&Acl>,
        ws_address: Option<String>,
    ) {
        let now_unix = secs(now_unix_ms);
        let key = ActorKey::of(id);
        let my_key = type_key(&id.r#type);
        let service_name = match &spec {
            Some(s) => s.name.clone(),
            None => format!("{}/{}", id.r#type.manufacturer, id.r#type.name),
        };
        let entry = Entry {
            actr_id: id.clone(),
            type_key: my_key.clone(),
            service_name,
            spec: spec.clone(),
            ws_address,
            availability: None,
            power_reserve: None,
            mailbox_backlog: None,
            last_heartbeat: now_unix,
            proto,
            remote: None,
        };
        self.out.push_back(Output::Persist(PersistOp::UpsertEntry(
            entry.persisted(now_unix.saturating_add(self.cfg.persist_ttl_secs)),
        )));
        match self.registry.insert(key, entry) {
            None => stats::inc(&self.stats.registry_entries),
            // A local actor replaces what another node said about the same key.
            Some(prev) if prev.remote.is_some() => {
                stats::dec(&self.stats.cluster_remote_actors);
                stats::inc(&self.stats.registry_entries);
            }
            Some(_) => {}
        }
        if let Some(spec) = spec {
            self.store_spec(now_unix, type_base(&id.r#type), spec);
        }
        if let Some(acl) = acl {
            self.install_acl(id.realm.realm_id, &my_key, acl);
            if self.cluster {
                self.acl_of.insert(key, acl.clone());
            }
        }
    }

    /// Keep a registered spec for compatibility analysis and persist it (unless the table is
    /// full, then neither).
    fn store_spec(&mut self, now_unix: u64, base: String, spec: ServiceSpec) {
        if !self.specs.store(base.clone(), &spec) {
            return;
        }
        self.out.push_back(Output::Persist(PersistOp::UpsertSpec {
            type_base: base,
            spec,
            stored_at: now_unix,
        }));
    }

    /// Drop `key` from memory and the database.
    pub(super) fn remove_actor(&mut self, key: ActorKey) {
        if self.registry.get(&key).is_some_and(|e| e.remote.is_none()) {
            self.registry.remove(&key);
            stats::dec(&self.stats.registry_entries);
        }
        self.out
            .push_back(Output::Persist(PersistOp::DeleteEntry(key)));
    }

    /// Count `evicted` entries the heartbeat sweep removed from memory.
    pub(super) fn count_evictions(&mut self, evicted: usize) {
        let evicted = evicted as u64;
        if evicted > 0 {
            self.stats
                .registry_evictions
                .fetch_add(evicted, std::sync::atomic::Ordering::Relaxed);
            self.stats
                .registry_entries
                .fetch_sub(evicted, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Unregister: the reply first, then the entry, the binding and the subscriptions go. The
    /// socket stays open.
    pub(super) fn on_unregister(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        u: UnregisterRequest,
    ) {
        tracing::debug!(reason = ?u.reason, "unregister");
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source.clone(),
            signaling_to_actr::Payload::UnregisterResponse(UnregisterResponse {
                result: Some(unregister_response::Result::Success(
                    unregister_response::UnregisterOk {},
                )),
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
        self.presence.drop_actor(key);
        self.cluster_down(key);
    }

    /// A credential update for `source` itself (one for another ActrId is ignored): an AIS
    /// call, answered through `handle_refresh_result`.
    pub(super) fn on_credential_update(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        r: CredentialUpdateRequest,
    ) {
        if r.actr_id != source {
            return;
        }
        if !self.ais_available {
            return self.error_to_actr(
                now_unix_ms,
                conn,
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

    /// The re-issued credential, sent as a RegisterResponse naming the unchanged `source`.
    pub(super) fn finish_refresh(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        result: Result<register_response::RegisterOk, String>,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        match result {
            Ok(mut ok) => {
                ok.actr_id = source.clone();
                self.reply(
                    now_unix_ms,
                    conn,
                    reply_for,
                    source,
                    signaling_to_actr::Payload::RegisterResponse(RegisterResponse {
                        result: Some(register_response::Result::Success(ok)),
                    }),
                );
            }
            Err(e) => self.error_to_actr(
                now_unix_ms,
                conn,
                &reply_for,
                source,
                500,
                format!("Failed to refresh credential: {e}"),
            ),
        }
    }

    /// A Ping: answered at once when the actor is in memory, otherwise after a restore.
    pub(super) fn on_ping(&mut self, now_unix_ms: u64, ping: PendingPing) {
        let local = self
            .registry
            .get(&ActorKey::of(&ping.source))
            .is_some_and(|e| e.remote.is_none());
        if !local {
            // Restore from the persisted rows first (wire section 8.3, ping row).
            self.out.push_back(Output::Restore(ping));
            return;
        }
        self.finish_ping(now_unix_ms, ping);
    }

    /// Re-insert a restored row (when found and the connection still speaks for the actor),
    /// then answer the Ping.
    pub(super) fn finish_restore(
        &mut self,
        now_unix_ms: u64,
        ping: PendingPing,
        row: Option<PersistedEntry>,
    ) {
        let key = ActorKey::of(&ping.source);
        let still_bound = self.by_actor.get(&key) == Some(&ping.conn);
        if !still_bound {
            return;
        }
        if let Some(row) = row {
            let absent = self.registry.get(&key).is_none_or(|e| e.remote.is_some());
            if ActorKey::of(&row.actr_id) == key && absent {
                if self.registry.contains_key(&key) {
                    // A stale remote entry for an actor now bound here.
                    stats::dec(&self.stats.cluster_remote_actors);
                }
                let entry = Entry {
                    type_key: type_key(&row.actr_id.r#type),
                    actr_id: row.actr_id,
                    service_name: row.service_name,
                    spec: row.spec,
                    ws_address: row.ws_address,
                    availability: row.availability,
                    power_reserve: row.power_reserve,
                    mailbox_backlog: row.mailbox_backlog,
                    last_heartbeat: secs(now_unix_ms),
                    proto: self.proto(ping.conn),
                    remote: None,
                };
                self.registry.insert(key, entry);
                stats::inc(&self.stats.registry_entries);
                stats::inc(&self.stats.registry_restores);
                self.cluster_up(key, false);
            }
        }
        self.finish_ping(now_unix_ms, ping);
    }

    /// Record the heartbeat and load, persist them, and send the Pong.
    fn finish_ping(&mut self, now_unix_ms: u64, p: PendingPing) {
        let PendingPing {
            conn,
            reply_for,
            source,
            ping,
            in_tolerance,
        } = p;
        let now_unix = secs(now_unix_ms);
        let key = ActorKey::of(&source);
        if let Some(e) = self.registry.get_mut(&key).filter(|e| e.remote.is_none()) {
            e.availability = Some(ping.availability);
            e.power_reserve = Some(ping.power_reserve);
            e.mailbox_backlog = Some(ping.mailbox_backlog);
            e.last_heartbeat = now_unix;
            self.out.push_back(Output::Persist(PersistOp::TouchEntry {
                key,
                expires_at: now_unix.saturating_add(self.cfg.persist_ttl_secs),
                availability: ping.availability,
                power_reserve: ping.power_reserve,
                mailbox_backlog: ping.mailbox_backlog,
            }));
            self.cluster_load(key, &ping);
        }
        let pong = Pong {
            seq: now_unix,
            suggest_interval_secs: Some(self.cfg.suggest_ping_interval_secs),
            credential_warning: in_tolerance.then(|| CredentialWarning {
                r#type: 0,
                message: TOLERANCE_WARNING.into(),
            }),
        };
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::Pong(pong),
        );
    }
}
