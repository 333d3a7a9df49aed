//! The fuzz harness of envelope decoding and dispatch: the sans-IO [`Hub`](crate::Hub) driven by a
//! script. `relay/fuzz` (cargo-fuzz target `signaling_envelope`) runs it coverage-guided; the
//! committed seed corpus is replayed by `tests/fuzz_corpus.rs`. It panics on a broken invariant.
//!
//! The input is a setup byte followed by operations; an operation cut short by the end of the
//! input is dropped. Setup byte: bit 0 AIS available, bit 1 answer AIS calls and restores
//! right after every step (as the I/O layer eventually does; otherwise they wait for an
//! Answer operation), bit 2 at most one ActrUp subscription per actor.
//!
//! Operations (first byte modulo 8):
//! - 0 Connect `[f]`: a new connection (ids count up from 1; at most 8 open). `f` bit 0: with
//!   the URL identity `ident(f >> 1)`; bit 4: wants the answerer role.
//! - 1 Disconnect `[s]`: the open connection in slot `s` (slots in connect order).
//! - 2, 6, 7 Frame `[s][v][len_hi][len_lo][len bytes]`: a binary frame on the connection in
//!   slot `s & 15`, decoded like the I/O layer does (a frame that does not decode gets an
//!   `envelope_error` 400 and the connection ignores later frames). `v` bits 0-2 choose the
//!   credential verdict (see `verdict`), bit 3 replaces the source with the connection's bound
//!   identity, bit 4 replaces a relay's target with the identity bound in slot `s >> 4`.
//! - 3 Advance `[hi][lo]`: the clock moves by `(hi << 8 | lo) * 250` ms, then the sweep runs.
//! - 4 Answer `[a]`: answer pending AIS call or restore `a & 15` (bit 7: as a failure; bit 6:
//!   a register gets serial `((a >> 4) & 3) + 1` instead of the connection id).
//! - 5 Rate limit `[s]`: the I/O layer's 429 `envelope_error` on slot `s`.
//!
//! After every step the outputs are drained and checked: sends and closes go to open
//! connections, relays carry no credential, stay in one realm and reach the connection bound
//! to their target, every sent envelope round-trips through the wire, no two connections are
//! bound to one actor, the registry holds only bound actors and the registry gauge matches.
//! Registry rows persisted by the hub are kept in a map that answers restores.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::hub::*;
use crate::proto::*;
use crate::{SignalingConfig, SignalingStats};
use prost::Message as _;

const START_MS: u64 = 1_700_000_000_000;
const MAX_CONNS: usize = 8;

/// Realm 1 is always valid, realm 2 for the first hour, any other is unknown.
struct Realms;

impl RealmCheck for Realms {
    fn check_realm(&mut self, now_unix_ms: u64, realm_id: u32) -> Result<(), String> {
        match realm_id {
            1 => Ok(()),
            2 if now_unix_ms < START_MS + 3_600_000 => Ok(()),
            2 => Err("realm expired".into()),
            _ => Err("realm not found".into()),
        }
    }
}

/// Identities for URL reconnects and foreign credentials: realms 1, 2 and 3 (unknown),
/// serials 1-4 (the serials the auto-answered AIS gives the first connections), types a:x:1
/// and a:y:1.
fn ident(i: u8) -> ActrId {
    let i = i % 8;
    ActrId {
        realm: Realm {
            realm_id: match i {
                0..=3 => 1,
                4 | 5 => 2,
                _ => 3,
            },
        },
        serial_number: u64::from(i % 4) + 1,
        r#type: ActrType {
            manufacturer: "a".into(),
            name: ["x", "y"][usize::from(i & 1)].into(),
            version: Some("1".into()),
        },
    }
}

fn hub(stats: Arc<SignalingStats>, ais: bool, few_subs: bool) -> Hub {
    let cfg = SignalingConfig {
        max_subscriptions_per_actor: if few_subs { 1 } else { 256 },
        ..SignalingConfig::default()
    };
    let mut n = 0u64;
    Hub::new(
        cfg,
        stats,
        ais,
        Box::new(move || {
            n += 1;
            format!("id-{n}")
        }),
        Loaded {
            acl: vec![
                (1, "a:x:1".into(), "a:y:1".into(), true),
                (1, "a:y:1".into(), "a:x:1".into(), true),
                (1, "a:x:1".into(), "a:x:1".into(), false),
                (2, "a:x:1".into(), "a:y:1".into(), true),
            ],
            specs: vec![],
        },
    )
}

/// The credential verdict chosen by `v & 7` for an envelope whose source is `src`.
fn verdict(now_unix_ms: u64, v: u8, src: &ActrId) -> Option<CredentialVerdict> {
    let now = now_unix_ms / 1000;
    let realm = src.realm.realm_id;
    let valid = |id: &ActrId, realm_id: u32, expr_time: u64, key_exp: u64, tol: u64| {
        Some(CredentialVerdict::Valid(Arc::new(VerifiedCredential {
            actor_id: actr_id_string(id),
            realm_id,
            expr_time,
            key_expires_at: key_exp,
            key_tolerance: tol,
        })))
    };
    match v & 7 {
        0 => None,
        1 => Some(CredentialVerdict::Invalid("token does not decrypt".into())),
        2 => valid(src, realm, u64::MAX, 0, 0),
        // Expired.
        3 => valid(src, realm, now.saturating_sub(1), 0, 0),
        // Key in its tolerance period: the Pong carries a warning.
        4 => valid(src, realm, now + 3600, now.saturating_sub(1), 3600),
        // Valid, but for someone else.
        5 => {
            let other = ident(v >> 5);
            valid(&other, other.realm.realm_id, u64::MAX, 0, 0)
        }
        // Names the source, another realm.
        6 => valid(src, realm.wrapping_add(1), u64::MAX, 0, 0),
        // Expires this very second; the key is past its tolerance.
        _ => valid(src, realm, now, now.saturating_sub(10), 5),
    }
}

/// Make the envelope speak for `src` and/or to `dst` (a well-behaved client's fields).
fn fix_up(env: &mut SignalingEnvelope, src: Option<&ActrId>, dst: Option<&ActrId>) {
    use actr_to_signaling::Payload as P;
    match &mut env.flow {
        Some(signaling_envelope::Flow::ActrToServer(a)) => {
            if let Some(s) = src {
                a.source = s.clone();
                match &mut a.payload {
                    Some(P::UnregisterRequest(u)) => u.actr_id = s.clone(),
                    Some(P::CredentialUpdateRequest(c)) => c.actr_id = s.clone(),
                    _ => {}
                }
            }
        }
        Some(signaling_envelope::Flow::ActrRelay(r)) => {
            if src.is_none() && dst.is_none() {
                return;
            }
            if let Some(s) = src {
                r.source = s.clone();
            }
            if let Some(d) = dst {
                r.target = d.clone();
            }
            if let Some(actr_relay::Payload::RoleNegotiation(rn)) = &mut r.payload {
                rn.from = r.source.clone();
                rn.to = r.target.clone();
                rn.realm_id = r.source.realm.realm_id;
            }
        }
        _ => {}
    }
}

/// A call the hub is waiting on, answered when the script says (or at once).
enum Pending {
    Ais(AisCall),
    Restore(PendingPing),
}

struct Harness {
    hub: Hub,
    stats: Arc<SignalingStats>,
    now_unix_ms: u64,
    /// Open connections in connect order (the slots).
    open: Vec<ConnId>,
    /// Connections that sent an undecodable frame: the I/O layer ignores their later frames.
    closing: BTreeSet<ConnId>,
    next_conn: u64,
    pending: VecDeque<Pending>,
    /// The registry rows the database would hold.
    db: BTreeMap<ActorKey, PersistedEntry>,
    auto_answer: bool,
}

impl Harness {
    fn slot(&self, s: u8) -> Option<ConnId> {
        if self.open.is_empty() {
            None
        } else {
            Some(self.open[usize::from(s) % self.open.len()])
        }
    }

    fn connect(&mut self, f: u8) {
        if self.open.len() >= MAX_CONNS {
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.open.push(conn);
        let identity = (f & 1 != 0).then(|| ident(f >> 1));
        self.hub
            .handle_connect(self.now_unix_ms, conn, identity, f & 0x10 != 0);
    }

    fn disconnect(&mut self, s: u8) {
        if self.open.is_empty() {
            return;
        }
        let conn = self.open.remove(usize::from(s) % self.open.len());
        self.closing.remove(&conn);
        self.hub.handle_disconnect(self.now_unix_ms, conn);
    }

    fn frame(&mut self, s: u8, v: u8, bytes: &[u8]) {
        let Some(conn) = self.slot(s & 15) else {
            return;
        };
        if self.closing.contains(&conn) {
            return;
        }
        let mut env = match SignalingEnvelope::decode(bytes) {
            Ok(env) => env,
            Err(e) => {
                self.hub.envelope_error(
                    self.now_unix_ms,
                    conn,
                    400,
                    format!("Malformed envelope: {e}"),
                );
                self.closing.insert(conn);
                return;
            }
        };
        let src = if v & 0x08 != 0 {
            self.hub.bound(conn).cloned()
        } else {
            None
        };
        let dst = match self.slot(s >> 4) {
            Some(t) if v & 0x10 != 0 => self.hub.bound(t).cloned(),
            _ => None,
        };
        fix_up(&mut env, src.as_ref(), dst.as_ref());
        // Like the I/O layer: only flows that carry a credential get a verdict.
        let source = match &env.flow {
            Some(signaling_envelope::Flow::ActrToServer(a)) => Some(a.source.clone()),
            Some(signaling_envelope::Flow::ActrRelay(r)) => Some(r.source.clone()),
            _ => None,
        };
        let verdict = source.and_then(|src| verdict(self.now_unix_ms, v, &src));
        self.hub
            .handle_envelope(self.now_unix_ms, conn, env, verdict, &mut Realms);
    }

    fn advance(&mut self, units: u16) {
        self.now_unix_ms += u64::from(units) * 250;
        self.hub.handle_timeout(self.now_unix_ms);
    }

    fn answer(&mut self, p: Pending, a: u8) {
        let fail = a & 0x80 != 0;
        let ok = |actr_id: ActrId| register_response::RegisterOk {
            actr_id,
            credential: AIdCredential {
                encrypted_token: vec![1, 2, 3],
                token_key_id: 1,
            },
            psk: None,
            credential_expires_at: None,
            signaling_heartbeat_interval_secs: 30,
        };
        match p {
            Pending::Ais(AisCall::Register {
                conn,
                reply_for,
                request,
            }) => {
                let result = if fail {
                    Err("AIS unavailable".to_owned())
                } else {
                    let serial_number = if a & 0x40 != 0 {
                        u64::from((a >> 4) & 3) + 1
                    } else {
                        conn.0
                    };
                    Ok(ok(ActrId {
                        realm: request.realm,
                        serial_number,
                        r#type: request.actr_type.clone(),
                    }))
                };
                self.hub
                    .handle_register_result(self.now_unix_ms, conn, reply_for, request, result);
            }
            Pending::Ais(AisCall::Refresh {
                conn,
                reply_for,
                source,
            }) => {
                let result = if fail {
                    Err("AIS unavailable".to_owned())
                } else {
                    Ok(ok(source.clone()))
                };
                self.hub
                    .handle_refresh_result(self.now_unix_ms, conn, reply_for, source, result);
            }
            Pending::Restore(p) => {
                let row = if fail {
                    None
                } else {
                    let now = self.now_unix_ms / 1000;
                    self.db
                        .get(&ActorKey::of(&p.source))
                        .filter(|r| r.expires_at >= now)
                        .cloned()
                };
                self.hub.handle_restored(self.now_unix_ms, p, row);
            }
        }
    }

    fn persist(&mut self, op: PersistOp) {
        match op {
            PersistOp::UpsertEntry(e) => {
                self.db.insert(ActorKey::of(&e.actr_id), e);
            }
            PersistOp::TouchEntry {
                key,
                expires_at,
                availability,
                power_reserve,
                mailbox_backlog,
            } => {
                if let Some(e) = self.db.get_mut(&key) {
                    e.expires_at = expires_at;
                    e.availability = Some(availability);
                    e.power_reserve = Some(power_reserve);
                    e.mailbox_backlog = Some(mailbox_backlog);
                }
            }
            PersistOp::DeleteEntry(key) => {
                self.db.remove(&key);
            }
            PersistOp::UpsertAcl { .. } | PersistOp::UpsertSpec { .. } => {}
        }
    }

    fn bound_key(&self, conn: ConnId) -> Option<ActorKey> {
        self.hub.bound(conn).map(ActorKey::of)
    }

    fn check_send(&self, conn: ConnId, env: &SignalingEnvelope) {
        assert!(self.open.contains(&conn), "send to unknown {conn:?}");
        match &env.flow {
            Some(signaling_envelope::Flow::ActrRelay(r)) => {
                assert!(
                    r.credential.encrypted_token.is_empty() && r.credential.token_key_id == 0,
                    "forwarded relay carries a credential"
                );
                assert_eq!(
                    r.source.realm.realm_id, r.target.realm.realm_id,
                    "cross-realm relay"
                );
                let to = self.bound_key(conn);
                if let Some(actr_relay::Payload::RoleAssignment(_)) = r.payload {
                    assert!(
                        to == Some(ActorKey::of(&r.source)) || to == Some(ActorKey::of(&r.target)),
                        "role assignment to a connection of neither party"
                    );
                } else {
                    assert_eq!(
                        to,
                        Some(ActorKey::of(&r.target)),
                        "relay delivered to a connection not bound to its target"
                    );
                }
            }
            Some(signaling_envelope::Flow::ServerToActr(s)) => {
                use signaling_to_actr::Payload as P;
                let realm = s.target.realm.realm_id;
                match &s.payload {
                    Some(P::ActrUpEvent(e)) => {
                        assert_eq!(e.actor_id.realm.realm_id, realm, "cross-realm ActrUp");
                        assert_eq!(
                            self.bound_key(conn),
                            Some(ActorKey::of(&s.target)),
                            "ActrUp to a connection not bound to the subscriber"
                        );
                    }
                    Some(P::RouteCandidatesResponse(RouteCandidatesResponse {
                        result: Some(route_candidates_response::Result::Success(ok)),
                    })) => {
                        let ids = ok
                            .candidates
                            .iter()
                            .chain(ok.compatibility_info.iter().map(|c| &c.candidate_id))
                            .chain(ok.ws_address_map.iter().map(|w| &w.candidate_id));
                        for id in ids {
                            assert_eq!(id.realm.realm_id, realm, "cross-realm candidate");
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // What the I/O layer puts on the wire decodes back to the same envelope.
        let bytes = env.encode_to_vec();
        let back = SignalingEnvelope::decode(&bytes[..]).expect("a sent envelope decodes");
        assert_eq!(&back, env, "a sent envelope does not round-trip");
    }

    /// Drain the hub's outputs (from one `handle_*` call) and check each.
    fn collect(&mut self) {
        let mut n = 0usize;
        while let Some(o) = self.hub.poll_output() {
            n += 1;
            assert!(n < 100_000, "output loop");
            match o {
                Output::Send { conn, envelope } => self.check_send(conn, &envelope),
                Output::Close { conn, .. } => {
                    assert!(self.open.contains(&conn), "close of unknown {conn:?}")
                }
                Output::Ais(call) => self.pending.push_back(Pending::Ais(call)),
                Output::Persist(op) => self.persist(op),
                Output::Restore(p) => self.pending.push_back(Pending::Restore(p)),
                Output::Cluster(_) => {}
            }
        }
    }

    fn check_state(&self) {
        assert_eq!(self.hub.connection_count(), self.open.len());
        let mut bound = BTreeSet::new();
        for &c in &self.open {
            if let Some(k) = self.bound_key(c) {
                assert!(bound.insert(k), "two connections bound to {k:?}");
            }
        }
        assert!(
            self.hub.registry_len() <= bound.len(),
            "registry entries without a bound connection"
        );
        assert_eq!(
            self.stats.registry_entries.load(Ordering::Relaxed),
            self.hub.registry_len() as u64,
            "registry gauge drifted"
        );
    }

    /// After every step: drain, answer (in auto mode) and check.
    fn settle(&mut self) {
        self.collect();
        if self.auto_answer {
            while let Some(p) = self.pending.pop_front() {
                self.answer(p, 0);
                self.collect();
            }
        }
        self.check_state();
    }
}

/// Run one script (see the module docs); panics when an invariant breaks.
pub fn script(data: &[u8]) {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let stats = Arc::new(SignalingStats::default());
    let mut h = Harness {
        hub: hub(stats.clone(), setup & 1 != 0, setup & 4 != 0),
        stats,
        now_unix_ms: START_MS,
        open: Vec::new(),
        closing: BTreeSet::new(),
        next_conn: 1,
        pending: VecDeque::new(),
        db: BTreeMap::new(),
        auto_answer: setup & 2 != 0,
    };
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 8 {
            0 | 1 | 4 | 5 => {
                let Some((&p, tail)) = rest.split_first() else {
                    break;
                };
                rest = tail;
                match op % 8 {
                    0 => h.connect(p),
                    1 => h.disconnect(p),
                    4 => {
                        if !h.pending.is_empty() {
                            let i = usize::from(p & 15) % h.pending.len();
                            if let Some(item) = h.pending.remove(i) {
                                h.answer(item, p);
                            }
                        }
                    }
                    _ => {
                        if let Some(conn) = h.slot(p) {
                            h.hub.envelope_error(
                                h.now_unix_ms,
                                conn,
                                429,
                                "Too many messages".into(),
                            );
                        }
                    }
                }
            }
            3 => {
                let [hi, lo, ..] = *rest else {
                    break;
                };
                rest = &rest[2..];
                h.advance(u16::from_be_bytes([hi, lo]));
            }
            _ => {
                let [s, v, hi, lo, ..] = *rest else {
                    break;
                };
                rest = &rest[4..];
                let len = usize::from(u16::from_be_bytes([hi, lo])).min(rest.len());
                let (frame, tail) = rest.split_at(len);
                rest = tail;
                h.frame(s, v, frame);
            }
        }
        h.settle();
    }
}
