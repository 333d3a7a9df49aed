//! Presence: ActrUp subscriptions (by exact ActrType, at most `max_subscriptions_per_actor`
//! per actor), the ActrUp events a registration sends to them, and the subscribers whose
//! connection went away.
//!
//! Subscriptions belong to the actor, not the connection: they survive a disconnect for a
//! reconnect within `heartbeat_timeout_secs` (then the sweep drops them), events go to
//! whatever connection is bound to the subscriber at the time, and unregister removes them.
//! What it deliberately does not do: there are no "down" events (the wire protocol has none:
//! a departed actor just leaves the registry), and an event never leaves the new actor's realm
//! nor reaches a subscriber the ACL does not let reach it.

use std::collections::{BTreeMap, HashMap};

use super::{ActorKey, ConnId, Hub};
use crate::proto::*;

/// Exact ActrType equality (the version's absence differs from any value), as a hashable key.
type TypeExact = (String, String, Option<String>);

fn type_exact(t: &ActrType) -> TypeExact {
    (t.manufacturer.clone(), t.name.clone(), t.version.clone())
}

/// The subscription tables.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Subscribed type → subscribers (with the identity they subscribed as).
    by_type: HashMap<TypeExact, BTreeMap<ActorKey, ActrId>>,
    /// Subscriber → the types it subscribed to.
    of: HashMap<ActorKey, Vec<TypeExact>>,
    /// Subscribers whose connection went away, with when (Unix seconds): their subscriptions
    /// are kept for a reconnect, and dropped by the sweep after `heartbeat_timeout_secs`.
    departed: HashMap<ActorKey, u64>,
}

impl Presence {
    /// The connection of `key` went away at `now_unix`: start its grace period, if it holds
    /// subscriptions.
    pub(super) fn departed(&mut self, now_unix: u64, key: ActorKey) {
        if self.of.contains_key(&key) {
            self.departed.insert(key, now_unix);
        }
    }

    /// Drop the subscriptions of actors gone for longer than `limit` seconds; an actor that
    /// `is_connected` again keeps its subscriptions and leaves the departed list.
    pub(super) fn sweep(
        &mut self,
        now_unix: u64,
        limit: u64,
        is_connected: impl Fn(&ActorKey) -> bool,
    ) {
        // Subscriptions survive a disconnect for a reconnect, but not forever: an actor that
        // left without unregistering would otherwise hold up to `max_subscriptions_per_actor`
        // entries for good. Back on a connection, it keeps them.
        let mut expired = Vec::new();
        self.departed.retain(|k, since| {
            if is_connected(k) {
                return false;
            }
            let keep = now_unix.saturating_sub(*since) <= limit;
            if !keep {
                expired.push(*k);
            }
            keep
        });
        for key in expired {
            self.drop_actor(key);
        }
    }

    /// Remove every subscription `key` holds.
    pub(super) fn drop_actor(&mut self, key: ActorKey) {
        self.departed.remove(&key);
        if let Some(types) = self.of.remove(&key) {
            for t in types {
                self.remove_subscriber(&t, key);
            }
        }
    }

    fn remove_subscriber(&mut self, t: &TypeExact, key: ActorKey) {
        if let Some(m) = self.by_type.get_mut(t) {
            m.remove(&key);
            if m.is_empty() {
                self.by_type.remove(t);
            }
        }
    }

    /// Subscribe `source` to `t`. `Err(())` when it already holds `max` other subscriptions.
    fn subscribe(&mut self, source: &ActrId, t: &ActrType, max: usize) -> Result<(), ()> {
        let key = ActorKey::of(source);
        let t = type_exact(t);
        let list = self.of.entry(key).or_default();
        if list.contains(&t) {
            Ok(())
        } else if list.len() >= max {
            Err(())
        } else {
            list.push(t.clone());
            self.by_type
                .entry(t)
                .or_default()
                .insert(key, source.clone());
            Ok(())
        }
    }

    fn unsubscribe(&mut self, key: ActorKey, t: &ActrType) {
        let t = type_exact(t);
        if let Some(list) = self.of.get_mut(&key) {
            list.retain(|x| x != &t);
            if list.is_empty() {
                self.of.remove(&key);
            }
        }
        self.remove_subscriber(&t, key);
    }

    /// The subscribers to exactly `t` in `realm`, other than `except`, in key order.
    fn subscribers_of(
        &self,
        t: &ActrType,
        realm: u32,
        except: ActorKey,
    ) -> Vec<(ActorKey, ActrId)> {
        self.by_type
            .get(&type_exact(t))
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.realm == realm && **k != except)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Hub {
    /// The number of actors holding ActrUp subscriptions (they survive a disconnect for
    /// `heartbeat_timeout_secs`, and end with unregister).
    pub fn subscribers(&self) -> usize {
        self.presence.of.len()
    }

    pub(super) fn on_subscribe(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        s: SubscribeActrUpRequest,
    ) {
        let max = self.cfg.max_subscriptions_per_actor;
        let result = match self.presence.subscribe(&source, &s.target_type, max) {
            Ok(()) => subscribe_actr_up_response::Result::Success(
                subscribe_actr_up_response::SubscribeOk {},
            ),
            Err(()) => {
                self.stats.count_error(429);
                subscribe_actr_up_response::Result::Error(ErrorResponse {
                    code: 429,
                    message: "Too many subscriptions".into(),
                })
            }
        };
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::SubscribeActrUpResponse(SubscribeActrUpResponse {
                result: Some(result),
            }),
        );
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        s: UnsubscribeActrUpRequest,
    ) {
        self.presence
            .unsubscribe(ActorKey::of(&source), &s.target_type);
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::UnsubscribeActrUpResponse(UnsubscribeActrUpResponse {
                result: Some(unsubscribe_actr_up_response::Result::Success(
                    unsubscribe_actr_up_response::UnsubscribeOk {},
                )),
            }),
        );
    }

    /// ActrUp for the newly registered `id` (of `type_key` `id_key`) to the subscribers of its
    /// exact type in its realm that the ACL lets reach it and that are connected.
    pub(super) fn announce(&mut self, now_unix_ms: u64, id: &ActrId, id_key: &str) {
        let realm = id.realm.realm_id;
        let proto = self
            .registry
            .get(&ActorKey::of(id))
            .map(|e| e.proto)
            .or_else(|| self.proto_of(&ActorKey::of(id)))
            .unwrap_or_default();
        let subs = self
            .presence
            .subscribers_of(&id.r#type, realm, ActorKey::of(id));
        for (sub_key, sub_id) in subs {
            if !self.acl_allows(realm, &type_key(&sub_id.r#type), id_key) {
                continue;
            }
            let Some(&sub_conn) = self.by_actor.get(&sub_key) else {
                continue;
            };
            if self.proto(sub_conn) != proto {
                continue;
            }
            self.send_to_actr(
                now_unix_ms,
                sub_conn,
                None,
                sub_id,
                signaling_to_actr::Payload::ActrUpEvent(ActrUpEvent {
                    actor_id: id.clone(),
                }),
            );
        }
    }
}
