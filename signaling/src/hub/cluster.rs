//! Cross-node signaling: what the hub tells the other nodes of a cluster and what it does with
//! what they tell it. The bus itself (NATS) is the I/O layer's business (`crate::cluster`);
//! here a remote node is just a name, and its events arrive through [`Hub::handle_remote`].
//!
//! With the cluster enabled ([`Hub::enable_cluster`]) every local registration, departure and
//! load change becomes a [`ClusterOut::Broadcast`], and a relay or RoleAssignment for an actor
//! held by another node becomes a [`ClusterOut::Deliver`] to that node. Remote actors live in
//! the same registry as local ones (so discovery, route candidates, service specs and ActrUp
//! see the whole cluster) but are never persisted, never swept by the heartbeat timeout (their
//! node's heartbeat on the bus stands for them) and leave with their node
//! ([`Hub::handle_node_gone`]) or with the bus ([`Hub::handle_cluster_lost`]).
//!
//! Rules: the sending node runs every relay check (realm, same realm, ACL, credential,
//! identity, its own rate limit) as for a local target; the receiving node checks again what it
//! can see itself (the target is bound here, same realm, ACL source type → target type) before
//! it hands the envelope to the connection. A local actor always wins over a remote entry with
//! the same key.

use std::sync::Arc;

use super::registry::Entry;
use super::{secs, type_base, ActorKey, Hub, Output, Proto};
use crate::proto::*;
use crate::stats;

/// An actor another node registered, as it travels on the bus.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteActor {
    pub actr_id: ActrId,
    pub proto: Proto,
    pub spec: Option<ServiceSpec>,
    pub acl: Option<Acl>,
    pub ws_address: Option<String>,
    /// The connection asked to answer (`webrtc_role=answer`), for role negotiation.
    pub wants_answer: bool,
    pub availability: Option<i32>,
    pub power_reserve: Option<f32>,
    pub mailbox_backlog: Option<f32>,
    /// A new registration (ActrUp goes to the subscribers), not a resync of a known one.
    pub fresh: bool,
}

/// What a node tells the others. Events pass through one at a time (never stored), so the
/// variants are not boxed to even out their sizes.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum RemoteEvent {
    Up(Box<RemoteActor>),
    Down(ActorKey),
    Load {
        key: ActorKey,
        availability: i32,
        power_reserve: f32,
        mailbox_backlog: f32,
    },
    /// A relay (or RoleAssignment) for `to`, an actor of the receiving node, already checked
    /// and stripped of its credential by the sending node.
    Deliver {
        to: ActorKey,
        envelope: SignalingEnvelope,
    },
}

/// Cluster traffic the hub wants sent.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "cluster traffic the I/O layer must publish"]
pub enum ClusterOut {
    /// To every other node.
    Broadcast(RemoteEvent),
    /// A [`RemoteEvent::Deliver`] to the node holding the target.
    Deliver {
        node: Arc<str>,
        to: ActorKey,
        envelope: SignalingEnvelope,
    },
}

/// Where a remote entry lives.
#[derive(Clone, Debug)]
pub(super) struct Remote {
    pub(super) node: Arc<str>,
    pub(super) wants_answer: bool,
}

impl Hub {
    /// Publish this hub's actors to a cluster and accept remote ones. Off by default: without
    /// it no cluster output is ever queued.
    pub fn enable_cluster(&mut self) {
        self.cluster = true;
    }

    /// Remote actors in memory.
    pub fn remote_len(&self) -> usize {
        self.registry
            .values()
            .filter(|e| e.remote.is_some())
            .count()
    }

    fn cluster_out(&mut self, o: ClusterOut) {
        if self.cluster {
            self.out.push_back(Output::Cluster(o));
        }
    }

    /// The bus form of the local entry `key` (`fresh` for a new registration).
    fn remote_actor(&self, key: &ActorKey, fresh: bool) -> Option<RemoteActor> {
        let e = self.registry.get(key).filter(|e| e.remote.is_none())?;
        Some(RemoteActor {
            actr_id: e.actr_id.clone(),
            proto: e.proto,
            spec: e.spec.clone(),
            acl: self.acl_of.get(key).cloned(),
            ws_address: e.ws_address.clone(),
            wants_answer: self
                .by_actor
                .get(key)
                .and_then(|c| self.conns.get(c))
                .is_some_and(|c| c.wants_answer),
            availability: e.availability,
            power_reserve: e.power_reserve,
            mailbox_backlog: e.mailbox_backlog,
            fresh,
        })
    }

    /// Tell the cluster about the local entry `key`.
    pub(super) fn cluster_up(&mut self, key: ActorKey, fresh: bool) {
        if !self.cluster {
            return;
        }
        if let Some(a) = self.remote_actor(&key, fresh) {
            self.cluster_out(ClusterOut::Broadcast(RemoteEvent::Up(Box::new(a))));
        }
    }

    /// Tell the cluster that the local actor `key` left.
    pub(super) fn cluster_down(&mut self, key: ActorKey) {
        self.acl_of.remove(&key);
        self.cluster_out(ClusterOut::Broadcast(RemoteEvent::Down(key)));
    }

    /// Tell the cluster the load the local actor `key` reported.
    pub(super) fn cluster_load(&mut self, key: ActorKey, ping: &Ping) {
        self.cluster_out(ClusterOut::Broadcast(RemoteEvent::Load {
            key,
            availability: ping.availability,
            power_reserve: ping.power_reserve,
            mailbox_backlog: ping.mailbox_backlog,
        }));
    }

    /// The node of the remote entry `key` when it speaks `proto`.
    pub(super) fn remote_node(&self, key: &ActorKey, proto: Proto) -> Option<Arc<str>> {
        self.registry
            .get(key)
            .filter(|e| e.proto == proto)
            .and_then(|e| e.remote.as_ref())
            .map(|r| r.node.clone())
    }

    /// Whether the remote entry `id` (full ActrId equality) asked to answer.
    pub(super) fn remote_wants_answer(&self, id: &ActrId) -> bool {
        self.registry
            .get(&ActorKey::of(id))
            .filter(|e| &e.actr_id == id)
            .and_then(|e| e.remote.as_ref())
            .is_some_and(|r| r.wants_answer)
    }

    /// Queue `envelope` for the remote actor `to` on `node`.
    pub(super) fn deliver_remote(
        &mut self,
        node: Arc<str>,
        to: ActorKey,
        envelope: SignalingEnvelope,
    ) {
        stats::inc(&self.stats.cluster_relays_out);
        self.cluster_out(ClusterOut::Deliver { node, to, envelope });
    }

    /// An event from `node`.
    pub fn handle_remote(&mut self, now_unix_ms: u64, node: &str, event: RemoteEvent) {
        if !self.cluster {
            return;
        }
        match event {
            RemoteEvent::Up(a) => self.remote_up(now_unix_ms, node, *a),
            RemoteEvent::Down(key) => {
                let from_node = self
                    .registry
                    .get(&key)
                    .and_then(|e| e.remote.as_ref())
                    .is_some_and(|r| &*r.node == node);
                if from_node {
                    self.registry.remove(&key);
                    stats::dec(&self.stats.cluster_remote_actors);
                }
            }
            RemoteEvent::Load {
                key,
                availability,
                power_reserve,
                mailbox_backlog,
            } => {
                if let Some(e) = self.registry.get_mut(&key) {
                    if e.remote.as_ref().is_some_and(|r| &*r.node == node) {
                        e.availability = Some(availability);
                        e.power_reserve = Some(power_reserve);
                        e.mailbox_backlog = Some(mailbox_backlog);
                        e.last_heartbeat = secs(now_unix_ms);
                    }
                }
            }
            RemoteEvent::Deliver { to, envelope } => self.remote_deliver(to, envelope),
        }
    }

    fn remote_up(&mut self, now_unix_ms: u64, node: &str, a: RemoteActor) {
        let key = ActorKey::of(&a.actr_id);
        match self.registry.get(&key) {
            // A local actor wins: the remote entry is stale or an impostor.
            Some(e) if e.remote.is_none() => return,
            Some(_) => {}
            None => stats::inc(&self.stats.cluster_remote_actors),
        }
        let my_key = type_key(&a.actr_id.r#type);
        let service_name = match &a.spec {
            Some(s) => s.name.clone(),
            None => format!(
                "{}/{}",
                a.actr_id.r#type.manufacturer, a.actr_id.r#type.name
            ),
        };
        if let Some(spec) = &a.spec {
            // Known for compatibility analysis here too; the owning node persists it.
            let _ = self.specs.store(type_base(&a.actr_id.r#type), spec);
        }
        if let Some(acl) = &a.acl {
            self.install_acl(a.actr_id.realm.realm_id, &my_key, acl);
        }
        let id = a.actr_id.clone();
        self.registry.insert(
            key,
            Entry {
                actr_id: a.actr_id,
                type_key: my_key.clone(),
                service_name,
                spec: a.spec,
                ws_address: a.ws_address,
                availability: a.availability,
                power_reserve: a.power_reserve,
                mailbox_backlog: a.mailbox_backlog,
                last_heartbeat: secs(now_unix_ms),
                proto: a.proto,
                remote: Some(Remote {
                    node: Arc::from(node),
                    wants_answer: a.wants_answer,
                }),
            },
        );
        if a.fresh {
            self.announce(now_unix_ms, &id, &my_key);
        }
    }

    /// A relay another node checked, for a local actor: the checks this node can make itself,
    /// then the connection.
    fn remote_deliver(&mut self, to: ActorKey, envelope: SignalingEnvelope) {
        let Some(signaling_envelope::Flow::ActrRelay(relay)) = &envelope.flow else {
            return;
        };
        let Some(&conn) = self.by_actor.get(&to) else {
            stats::inc(&self.stats.relays_no_target);
            return;
        };
        let realm = relay.source.realm.realm_id;
        let target_realm_ok = relay.target.realm.realm_id == realm && to.realm == realm;
        let acl_ok = match &relay.payload {
            // Role assignments name both parties; the requester's ACL was checked at its node.
            Some(actr_relay::Payload::RoleAssignment(_)) => true,
            _ => {
                ActorKey::of(&relay.target) == to
                    && self.acl_allows(
                        realm,
                        &type_key(&relay.source.r#type),
                        &type_key(&relay.target.r#type),
                    )
            }
        };
        let no_credential = relay.credential.encrypted_token.is_empty();
        if !(target_realm_ok && acl_ok && no_credential) {
            stats::inc(&self.stats.cluster_relays_refused);
            return;
        }
        stats::inc(&self.stats.cluster_relays_in);
        stats::inc(&self.stats.envelopes_relayed);
        self.send(conn, envelope);
    }

    /// `node` stopped heartbeating: its actors leave.
    pub fn handle_node_gone(&mut self, _now_unix_ms: u64, node: &str) {
        self.drop_remote(|r| &*r.node == node);
    }

    /// The bus is unreachable: every remote actor leaves and routing is local only until the
    /// nodes resync.
    pub fn handle_cluster_lost(&mut self, _now_unix_ms: u64) {
        self.drop_remote(|_| true);
    }

    fn drop_remote(&mut self, which: impl Fn(&Remote) -> bool) {
        let before = self.registry.len();
        self.registry
            .retain(|_, e| !e.remote.as_ref().is_some_and(&which));
        let gone = (before - self.registry.len()) as u64;
        self.stats
            .cluster_remote_actors
            .fetch_sub(gone, std::sync::atomic::Ordering::Relaxed);
    }

    /// Announce every local actor again (another node joined, or the bus came back). In
    /// registry order, so the output is deterministic.
    pub fn handle_resync(&mut self, _now_unix_ms: u64) {
        if !self.cluster {
            return;
        }
        let keys: Vec<ActorKey> = self
            .registry
            .iter()
            .filter(|(_, e)| e.remote.is_none())
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.cluster_up(k, false);
        }
    }
}
