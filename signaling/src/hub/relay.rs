//! Relay between actors (wire sections 8.3 last rows, 8.5 and 9.3): SDP, ICE candidates and
//! ICE restarts are forwarded to the connection bound to the target, and a role negotiation is
//! answered with one RoleAssignment to each side.
//!
//! The checks run in the order of wire section 8.3: realm, same realm, ACL (source type → peer
//! type), credential, identity. Forwarded envelopes carry an empty credential and no
//! `reply_for`. What it deliberately does not do: it never queues for an actor that is not
//! connected (a missing target is a counted silent drop), and it never looks inside the SDP or
//! ICE payloads.

use super::{ActorKey, ConnId, CredentialVerdict, Hub, RealmCheck};
use crate::proto::*;
use crate::stats;

fn empty_credential() -> AIdCredential {
    AIdCredential {
        encrypted_token: Vec::new(),
        token_key_id: 0,
    }
}

impl Hub {
    pub(super) fn on_relay(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        relay: ActrRelay,
        verdict: Option<CredentialVerdict>,
        realms: &mut dyn RealmCheck,
    ) {
        // 1-3: realm, same realm, ACL.
        if let Err(message) = self.check_relay(now_unix_ms, &relay, realms) {
            return self.error_to_actr(
                now_unix_ms,
                conn,
                &reply_for,
                relay.source.clone(),
                403,
                message,
            );
        }
        // 4, 5 and 9.1: credential, credential names source, connection bound to source (the
        // realm was checked above).
        if self
            .authenticate(now_unix_ms, conn, &reply_for, &relay.source, verdict, None)
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
                let proto = self.proto(conn);
                self.negotiate_roles(now_unix_ms, proto, rn);
            }
            payload => {
                let target_key = ActorKey::of(&target);
                // An actor of the other protocol is not a target: nothing crosses over.
                let to_conn = self
                    .by_actor
                    .get(&target_key)
                    .copied()
                    .filter(|c| self.proto(*c) == self.proto(conn));
                let remote = match to_conn {
                    Some(_) => None,
                    None => self.remote_node(&target_key, self.proto(conn)),
                };
                if to_conn.is_none() && remote.is_none() {
                    stats::inc(&self.stats.relays_no_target);
                    return;
                }
                // Forward unchanged except the sender's bearer credential (wire section 9.3).
                let env = self.envelope(
                    now_unix_ms,
                    None,
                    signaling_envelope::Flow::ActrRelay(ActrRelay {
                        source,
                        credential: empty_credential(),
                        target,
                        payload,
                    }),
                );
                match (to_conn, remote) {
                    (Some(to_conn), _) => {
                        stats::inc(&self.stats.envelopes_relayed);
                        self.send(to_conn, env);
                    }
                    // The target's node delivers it after its own checks (`cluster.rs`).
                    (None, Some(node)) => self.deliver_remote(node, target_key, env),
                    (None, None) => {}
                }
            }
        }
    }

    /// Checks 1-3 of a relay in their order (realm valid, one realm, ACL source type → peer
    /// type): the message of the 403 for the first that fails.
    fn check_relay(
        &self,
        now_unix_ms: u64,
        relay: &ActrRelay,
        realms: &mut dyn RealmCheck,
    ) -> Result<(), String> {
        let source = &relay.source;
        let realm = source.realm.realm_id;
        // 1. Realm valid.
        realms
            .check_realm(now_unix_ms, realm)
            .map_err(|e| format!("Realm validation failed: {e}"))?;
        // For role negotiation the parties come from the payload (wire section 8.5); the
        // requester must be one of them and both must be in its realm.
        let peer = match &relay.payload {
            Some(actr_relay::Payload::RoleNegotiation(rn)) => {
                let sk = ActorKey::of(source);
                if ActorKey::of(&rn.from) == sk {
                    &rn.to
                } else if ActorKey::of(&rn.to) == sk {
                    &rn.from
                } else {
                    return Err(
                        "Source identity mismatch: requester is not a party of the negotiation"
                            .into(),
                    );
                }
            }
            _ => &relay.target,
        };
        // 2. Same realm.
        if peer.realm.realm_id != realm || relay.target.realm.realm_id != realm {
            return Err("Cross-realm relay is not allowed".into());
        }
        // 3. ACL.
        if !self.acl_allows(realm, &type_key(&source.r#type), &type_key(&peer.r#type)) {
            return Err("ACL policy denies relay to target actor".into());
        }
        Ok(())
    }

    fn wants_answer(&self, id: &ActrId) -> bool {
        let local = self.by_actor.get(&ActorKey::of(id));
        match local {
            Some(c) => self
                .conns
                .get(c)
                .is_some_and(|c| c.wants_answer && c.bound.as_ref() == Some(id)),
            None => self.remote_wants_answer(id),
        }
    }

    /// Wire section 8.5: offerer choice, and one RoleAssignment to each side with `from` and
    /// `to` copied byte-exact.
    fn negotiate_roles(&mut self, now_unix_ms: u64, proto: super::Proto, rn: RoleNegotiation) {
        let from_answer = self.wants_answer(&rn.from);
        let to_answer = self.wants_answer(&rn.to);
        // If exactly one side wants to answer, it answers; otherwise the smaller
        // (realm, serial, manufacturer, name) offers.
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
            let (local, remote) = match self.by_actor.get(&key) {
                Some(&c) if self.proto(c) == proto => (Some(c), None),
                Some(_) => continue,
                None => match self.remote_node(&key, proto) {
                    Some(node) => (None, Some(node)),
                    None => continue,
                },
            };
            let env = self.envelope(
                now_unix_ms,
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
            match (local, remote) {
                (Some(c), _) => self.send(c, env),
                (None, Some(node)) => self.deliver_remote(node, key, env),
                (None, None) => {}
            }
        }
    }
}
