//! Two sans-IO hubs joined by a virtual bus (no NATS, no sockets, no clock): what one node's
//! hub publishes is handed to the other's `handle_remote`, as the bridge does. Remote actors
//! show in discovery, relays cross with the sending node's ACL applied and the credential
//! stripped, the receiving node refuses what its own ACL forbids, a node gone or a bus lost
//! takes the remote actors away, a resync brings them back, and a hub without the cluster
//! emits no cluster output at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use actrix_signaling::hub::*;
use actrix_signaling::proto::*;
use actrix_signaling::{SignalingConfig, SignalingStats};

const NOW: u64 = 1_000_000;

struct Realms;

impl RealmCheck for Realms {
    fn check_realm(&mut self, _now_unix_ms: u64, realm_id: u32) -> Result<(), String> {
        if realm_id == 1 {
            Ok(())
        } else {
            Err("realm not found".into())
        }
    }
}

fn ty(name: &str) -> ActrType {
    ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
        version: Some("1".into()),
    }
}

fn allow(from: &[&str]) -> Acl {
    Acl {
        rules: vec![AclRule {
            principals: from
                .iter()
                .map(|n| acl_rule::Principal {
                    realm: None,
                    actr_type: Some(ty(n)),
                })
                .collect(),
            permission: acl_rule::ALLOW,
        }],
    }
}

/// One node: its hub, its stats, what it sent to its connections, and its serial base.
struct Node {
    name: &'static str,
    hub: Hub,
    stats: Arc<SignalingStats>,
    sent: BTreeMap<ConnId, Vec<SignalingEnvelope>>,
    serial_base: u64,
}

impl Node {
    fn new(name: &'static str, serial_base: u64, cluster: bool) -> Node {
        let stats = Arc::new(SignalingStats::default());
        let mut n = 0u64;
        let mut hub = Hub::new(
            SignalingConfig::default(),
            stats.clone(),
            true,
            Box::new(move || {
                n += 1;
                format!("{name}-{n}")
            }),
            Loaded::default(),
        );
        if cluster {
            hub.enable_cluster();
        }
        Node {
            name,
            hub,
            stats,
            sent: BTreeMap::new(),
            serial_base,
        }
    }

    fn take(&mut self, conn: ConnId) -> Vec<SignalingEnvelope> {
        self.sent.remove(&conn).unwrap_or_default()
    }
}

/// Drain every hub, answering AIS calls and carrying cluster traffic to the other nodes, until
/// nothing moves. Returns the cluster messages carried.
fn settle(nodes: &mut [&mut Node]) -> Vec<ClusterOut> {
    let mut carried = Vec::new();
    loop {
        let mut bus: Vec<(&'static str, ClusterOut)> = Vec::new();
        for n in nodes.iter_mut() {
            while let Some(o) = n.hub.poll_output() {
                match o {
                    Output::Send { conn, envelope } => {
                        n.sent.entry(conn).or_default().push(envelope)
                    }
                    Output::Ais(AisCall::Register {
                        conn,
                        reply_for,
                        request,
                    }) => {
                        let ok = register_response::RegisterOk {
                            actr_id: ActrId {
                                realm: request.realm,
                                serial_number: n.serial_base + conn.0,
                                r#type: request.actr_type.clone(),
                            },
                            credential: AIdCredential::default(),
                            psk: None,
                            credential_expires_at: None,
                            signaling_heartbeat_interval_secs: 30,
                        };
                        n.hub
                            .handle_register_result(NOW, conn, reply_for, request, Ok(ok));
                    }
                    Output::Cluster(c) => bus.push((n.name, c)),
                    _ => {}
                }
            }
        }
        if bus.is_empty() {
            return carried;
        }
        for (from, c) in bus {
            carried.push(c.clone());
            for n in nodes.iter_mut().filter(|n| n.name != from) {
                match c.clone() {
                    ClusterOut::Broadcast(ev) => n.hub.handle_remote(NOW, from, ev),
                    ClusterOut::Deliver { node, to, envelope } if &*node == n.name => n
                        .hub
                        .handle_remote(NOW, from, RemoteEvent::Deliver { to, envelope }),
                    ClusterOut::Deliver { .. } => {}
                }
            }
        }
    }
}

fn valid(id: &ActrId) -> Option<CredentialVerdict> {
    Some(CredentialVerdict::Valid(Arc::new(VerifiedCredential {
        actor_id: actr_id_string(id),
        realm_id: id.realm.realm_id,
        expr_time: u64::MAX,
        key_expires_at: 0,
        key_tolerance: 0,
    })))
}

fn envelope(id: &str, flow: signaling_envelope::Flow) -> SignalingEnvelope {
    SignalingEnvelope {
        envelope_version: 1,
        envelope_id: id.into(),
        flow: Some(flow),
        ..Default::default()
    }
}

/// Register `name` on connection `conn` of `node`; its ActrId.
fn register(nodes: &mut [&mut Node], i: usize, conn: ConnId, name: &str, acl: &[&str]) -> ActrId {
    let n = &mut nodes[i];
    n.hub.handle_connect(NOW, conn, None, false);
    let req = RegisterRequest {
        actr_type: ty(name),
        realm: Realm { realm_id: 1 },
        acl: Some(allow(acl)),
        ..Default::default()
    };
    n.hub.handle_envelope(
        NOW,
        conn,
        envelope(
            "reg",
            signaling_envelope::Flow::PeerToServer(PeerToSignaling {
                payload: Some(peer_to_signaling::Payload::RegisterRequest(req)),
            }),
        ),
        None,
        &mut Realms,
    );
    settle(nodes);
    let id = nodes[i].hub.bound(conn).cloned().expect("registered");
    nodes[i].take(conn);
    id
}

fn discover(n: &mut Node, conn: ConnId, me: &ActrId) -> Vec<String> {
    let flow = signaling_envelope::Flow::ActrToServer(ActrToSignaling {
        source: me.clone(),
        credential: AIdCredential::default(),
        payload: Some(actr_to_signaling::Payload::DiscoveryRequest(
            DiscoveryRequest {
                manufacturer: None,
                limit: None,
            },
        )),
    });
    n.hub
        .handle_envelope(NOW, conn, envelope("d", flow), valid(me), &mut Realms);
    settle(&mut [n]);
    let env = n.take(conn).pop().expect("discovery answer");
    match env.flow {
        Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
            payload: Some(signaling_to_actr::Payload::DiscoveryResponse(d)),
            ..
        })) => match d.result {
            Some(discovery_response::Result::Success(ok)) => {
                ok.entries.into_iter().map(|e| e.actr_type.name).collect()
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn relay(from: &ActrId, to: &ActrId, text: &str) -> SignalingEnvelope {
    envelope(
        text,
        signaling_envelope::Flow::ActrRelay(ActrRelay {
            source: from.clone(),
            credential: AIdCredential {
                encrypted_token: b"secret".to_vec(),
                token_key_id: 9,
            },
            target: to.clone(),
            payload: Some(actr_relay::Payload::SessionDescription(
                SessionDescription {
                    r#type: 0,
                    sdp: text.into(),
                    sdp_exchange_id: None,
                },
            )),
        }),
    )
}

#[test]
fn relays_discovery_and_departures_cross_nodes() {
    let mut a = Node::new("a", 1000, true);
    let mut b = Node::new("b", 2000, true);
    let callee = register(&mut [&mut a, &mut b], 0, ConnId(1), "callee", &["caller"]);
    let caller = register(&mut [&mut a, &mut b], 1, ConnId(1), "caller", &["callee"]);
    let stranger = register(&mut [&mut a, &mut b], 1, ConnId(2), "stranger", &[]);
    assert_eq!(a.hub.remote_len(), 2);
    assert_eq!(b.hub.remote_len(), 1);

    // Discovery on b shows a's callee (ACL caller -> callee came with its registration).
    assert_eq!(discover(&mut b, ConnId(1), &caller), ["callee"]);

    // Relay b -> a: delivered by a, credential stripped, nothing left on b.
    b.hub.handle_envelope(
        NOW,
        ConnId(1),
        relay(&caller, &callee, "offer"),
        valid(&caller),
        &mut Realms,
    );
    let carried = settle(&mut [&mut a, &mut b]);
    assert!(
        matches!(&carried[..], [ClusterOut::Deliver { node, .. }] if &**node == "a"),
        "{carried:?}"
    );
    let got = a.take(ConnId(1));
    assert_eq!(got.len(), 1);
    let Some(signaling_envelope::Flow::ActrRelay(r)) = &got[0].flow else {
        panic!("{got:?}")
    };
    assert_eq!(r.source, caller);
    assert!(r.credential.encrypted_token.is_empty());
    assert!(b.take(ConnId(1)).is_empty());

    // The sending node's ACL: the stranger gets 403 and nothing goes on the bus.
    b.hub.handle_envelope(
        NOW,
        ConnId(2),
        relay(&stranger, &callee, "intrusion"),
        valid(&stranger),
        &mut Realms,
    );
    assert!(settle(&mut [&mut a, &mut b]).is_empty());
    let refusal = b.take(ConnId(2));
    assert!(
        matches!(
            &refusal[0].flow,
            Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
                payload: Some(signaling_to_actr::Payload::Error(ErrorResponse {
                    code: 403,
                    ..
                })),
                ..
            }))
        ),
        "{refusal:?}"
    );

    // The receiving node's ACL too: a Deliver its table forbids is refused and counted.
    let mut forged = relay(&stranger, &callee, "forged");
    if let Some(signaling_envelope::Flow::ActrRelay(r)) = &mut forged.flow {
        r.credential = AIdCredential::default();
    }
    a.hub.handle_remote(
        NOW,
        "b",
        RemoteEvent::Deliver {
            to: ActorKey::of(&callee),
            envelope: forged,
        },
    );
    settle(&mut [&mut a]);
    assert!(a.take(ConnId(1)).is_empty());
    assert_eq!(
        a.stats
            .cluster_relays_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // a's callee disconnects: it leaves b.
    a.hub.handle_disconnect(NOW, ConnId(1));
    settle(&mut [&mut a, &mut b]);
    assert!(discover(&mut b, ConnId(1), &caller).is_empty());

    // a node gone takes its actors; a resync brings them back.
    assert_eq!(a.hub.remote_len(), 2);
    a.hub.handle_node_gone(NOW, "b");
    assert_eq!(a.hub.remote_len(), 0);
    b.hub.handle_resync(NOW);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(a.hub.remote_len(), 2);
    a.hub.handle_cluster_lost(NOW);
    assert_eq!(a.hub.remote_len(), 0);
    assert_eq!(
        a.stats
            .cluster_remote_actors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn presence_crosses_nodes() {
    let mut a = Node::new("a", 1000, true);
    let mut b = Node::new("b", 2000, true);
    let caller = register(&mut [&mut a, &mut b], 1, ConnId(1), "caller", &["callee"]);
    let sub = signaling_envelope::Flow::ActrToServer(ActrToSignaling {
        source: caller.clone(),
        credential: AIdCredential::default(),
        payload: Some(actr_to_signaling::Payload::SubscribeActrUpRequest(
            SubscribeActrUpRequest {
                target_type: ty("callee"),
            },
        )),
    });
    b.hub.handle_envelope(
        NOW,
        ConnId(1),
        envelope("s", sub),
        valid(&caller),
        &mut Realms,
    );
    settle(&mut [&mut a, &mut b]);
    b.take(ConnId(1));
    let callee = register(&mut [&mut a, &mut b], 0, ConnId(1), "callee", &["caller"]);
    let got = b.take(ConnId(1));
    assert!(
        matches!(
            &got[..],
            [SignalingEnvelope {
                flow: Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
                    payload: Some(signaling_to_actr::Payload::ActrUpEvent(ActrUpEvent { actor_id })),
                    ..
                })),
                ..
            }] if *actor_id == callee
        ),
        "{got:?}"
    );
    // A resync is not a new registration: no second ActrUp.
    a.hub.handle_resync(NOW);
    settle(&mut [&mut a, &mut b]);
    assert!(b.take(ConnId(1)).is_empty());
}

#[test]
fn without_the_cluster_nothing_is_published() {
    let mut a = Node::new("a", 1000, false);
    let mut b = Node::new("b", 2000, false);
    let callee = register(&mut [&mut a, &mut b], 0, ConnId(1), "callee", &["caller"]);
    let caller = register(&mut [&mut a, &mut b], 1, ConnId(1), "caller", &["callee"]);
    b.hub.handle_envelope(
        NOW,
        ConnId(1),
        relay(&caller, &callee, "offer"),
        valid(&caller),
        &mut Realms,
    );
    assert!(settle(&mut [&mut a, &mut b]).is_empty());
    a.hub.handle_resync(NOW);
    b.hub
        .handle_remote(NOW, "a", RemoteEvent::Down(ActorKey::of(&callee)));
    assert!(settle(&mut [&mut a, &mut b]).is_empty());
    assert!(discover(&mut b, ConnId(1), &caller).is_empty());
}

#[test]
fn a_local_actor_replaces_a_remote_entry_with_its_key() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut a = Node::new("a", 1000, true);
    let mut stale = ActrId {
        realm: Realm { realm_id: 1 },
        serial_number: 1001,
        r#type: ty("callee"),
    };
    a.hub.handle_remote(
        NOW,
        "b",
        RemoteEvent::Up(Box::new(RemoteActor {
            actr_id: stale.clone(),
            proto: Proto::V1,
            spec: None,
            acl: None,
            ws_address: None,
            wants_answer: false,
            availability: None,
            power_reserve: None,
            mailbox_backlog: None,
            fresh: true,
        })),
    );
    assert_eq!(a.stats.cluster_remote_actors.load(Relaxed), 1);
    let id = register(&mut [&mut a], 0, ConnId(1), "callee", &[]);
    stale.r#type = id.r#type.clone();
    assert_eq!(id, stale, "same key");
    assert_eq!(a.hub.remote_len(), 0);
    assert_eq!(a.stats.cluster_remote_actors.load(Relaxed), 0);
    assert_eq!(a.stats.registry_entries.load(Relaxed), 1);
    // And a later Up from b for that key does not take it back.
    b_up_is_ignored(&mut a, &id);
}

fn b_up_is_ignored(a: &mut Node, id: &ActrId) {
    a.hub.handle_remote(
        NOW,
        "b",
        RemoteEvent::Up(Box::new(RemoteActor {
            actr_id: id.clone(),
            proto: Proto::V1,
            spec: None,
            acl: None,
            ws_address: None,
            wants_answer: false,
            availability: None,
            power_reserve: None,
            mailbox_backlog: None,
            fresh: false,
        })),
    );
    assert_eq!(a.hub.remote_len(), 0);
    a.hub
        .handle_remote(NOW, "b", RemoteEvent::Down(ActorKey::of(id)));
    assert_eq!(a.hub.registry_len(), 1, "b cannot remove a's actor");
}

#[test]
fn route_candidates_include_remote_instances() {
    let mut a = Node::new("a", 1000, true);
    let mut b = Node::new("b", 2000, true);
    let remote = register(&mut [&mut a, &mut b], 0, ConnId(1), "callee", &["caller"]);
    let local = register(&mut [&mut a, &mut b], 1, ConnId(2), "callee", &["caller"]);
    let caller = register(&mut [&mut a, &mut b], 1, ConnId(1), "caller", &["callee"]);
    let flow = signaling_envelope::Flow::ActrToServer(ActrToSignaling {
        source: caller.clone(),
        credential: AIdCredential::default(),
        payload: Some(actr_to_signaling::Payload::RouteCandidatesRequest(
            RouteCandidatesRequest {
                target_type: ty("callee"),
                criteria: None,
                client_location: None,
                client_fingerprint: String::new(),
            },
        )),
    });
    b.hub.handle_envelope(
        NOW,
        ConnId(1),
        envelope("rc", flow),
        valid(&caller),
        &mut Realms,
    );
    settle(&mut [&mut a, &mut b]);
    let got = b.take(ConnId(1));
    let Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
        payload: Some(signaling_to_actr::Payload::RouteCandidatesResponse(r)),
        ..
    })) = &got[0].flow
    else {
        panic!("{got:?}")
    };
    let Some(route_candidates_response::Result::Success(ok)) = &r.result else {
        panic!("{r:?}")
    };
    let mut serials: Vec<u64> = ok.candidates.iter().map(|c| c.serial_number).collect();
    serials.sort_unstable();
    assert_eq!(serials, [remote.serial_number, local.serial_number]);
}
