//! Fuzz-style properties of envelope decoding and of the sans-IO hub: random bytes and random
//! well-formed envelopes, with random credential verdicts and connection churn, never panic,
//! and every output targets a connection the hub knows or just closed.

// Tests drive real servers in real time; the purity rule of clippy.toml is the hub's.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;

use actrix_signaling::hub::*;
use actrix_signaling::proto::*;
use actrix_signaling::{SignalingConfig, SignalingStats};
use proptest::prelude::*;
use prost::Message as _;

struct Realms;

impl RealmCheck for Realms {
    fn check_realm(&mut self, _now_unix_ms: u64, realm_id: u32) -> Result<(), String> {
        if realm_id == 1 || realm_id == 2 {
            Ok(())
        } else {
            Err("realm not found".into())
        }
    }
}

fn hub() -> Hub {
    let mut n = 0u64;
    Hub::new(
        SignalingConfig::default(),
        Arc::new(SignalingStats::default()),
        true,
        Box::new(move || {
            n += 1;
            format!("id-{n}")
        }),
        Loaded {
            acl: vec![(1, "a:x:1".into(), "a:y:1".into(), true)],
            specs: vec![],
        },
    )
}

fn id(realm: u32, serial: u64, name: &str) -> ActrId {
    ActrId {
        realm: Realm { realm_id: realm },
        serial_number: serial,
        r#type: ActrType {
            manufacturer: "a".into(),
            name: name.into(),
            version: Some("1".into()),
        },
    }
}

fn drain(h: &mut Hub) -> usize {
    let mut n = 0;
    while let Some(o) = h.poll_output() {
        n += 1;
        // Answer AIS calls and restores like the I/O layer would, to reach those paths too.
        match o {
            Output::Ais(AisCall::Register {
                conn,
                reply_for,
                request,
            }) => {
                let ok = register_response::RegisterOk {
                    actr_id: ActrId {
                        realm: request.realm,
                        serial_number: 7 + conn.0,
                        r#type: request.actr_type.clone(),
                    },
                    credential: AIdCredential::default(),
                    psk: None,
                    credential_expires_at: None,
                    signaling_heartbeat_interval_secs: 30,
                };
                h.handle_register_result(1000, conn, reply_for, request, Ok(ok));
            }
            Output::Restore(p) => h.handle_restored(1000, p, None),
            _ => {}
        }
        assert!(n < 100_000, "output loop");
    }
    n
}

fn verdict(kind: u8, realm: u32, serial: u64, name: &str) -> Option<CredentialVerdict> {
    match kind % 4 {
        0 => None,
        1 => Some(CredentialVerdict::Invalid("bad".into())),
        2 => Some(CredentialVerdict::Valid(Arc::new(VerifiedCredential {
            actor_id: actr_id_string(&id(realm, serial, name)),
            realm_id: realm,
            expr_time: u64::MAX,
            key_expires_at: 1,
            key_tolerance: 10,
        }))),
        _ => Some(CredentialVerdict::Valid(Arc::new(VerifiedCredential {
            actor_id: "someone else".into(),
            realm_id: realm,
            expr_time: 0,
            key_expires_at: 0,
            key_tolerance: 0,
        }))),
    }
}

fn flow(kind: u8, src: ActrId, dst: ActrId) -> Option<signaling_envelope::Flow> {
    use actr_to_signaling::Payload as P;
    let cred = AIdCredential::default();
    let actr = |p: P| {
        Some(signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: src.clone(),
            credential: cred.clone(),
            payload: Some(p),
        }))
    };
    let relay = |p: actr_relay::Payload| {
        Some(signaling_envelope::Flow::ActrRelay(ActrRelay {
            source: src.clone(),
            credential: cred.clone(),
            target: dst.clone(),
            payload: Some(p),
        }))
    };
    match kind % 16 {
        0 => Some(signaling_envelope::Flow::PeerToServer(PeerToSignaling {
            payload: Some(peer_to_signaling::Payload::RegisterRequest(
                RegisterRequest {
                    actr_type: src.r#type.clone(),
                    realm: src.realm,
                    service_spec: Some(ServiceSpec {
                        name: "s".into(),
                        fingerprint: "f".into(),
                        ..Default::default()
                    }),
                    acl: Some(Acl {
                        rules: vec![AclRule {
                            principals: vec![acl_rule::Principal {
                                realm: None,
                                actr_type: Some(dst.r#type.clone()),
                            }],
                            permission: acl_rule::ALLOW,
                        }],
                    }),
                    service: None,
                    ws_address: None,
                },
            )),
        })),
        1 => actr(P::Ping(Ping::default())),
        2 => actr(P::UnregisterRequest(UnregisterRequest {
            actr_id: src.clone(),
            reason: None,
        })),
        3 => actr(P::CredentialUpdateRequest(CredentialUpdateRequest {
            actr_id: src.clone(),
        })),
        4 => actr(P::DiscoveryRequest(DiscoveryRequest::default())),
        5 => actr(P::RouteCandidatesRequest(RouteCandidatesRequest {
            target_type: dst.r#type.clone(),
            criteria: Some(route_candidates_request::NodeSelectionCriteria {
                candidate_count: 3,
                ranking_factors: vec![0, 1, 2, 3, 4, 99],
                minimal_dependency_requirement: Some(1),
                minimal_health_requirement: Some(0),
            }),
            client_location: None,
            client_fingerprint: String::new(),
        })),
        6 => actr(P::RouteCandidatesRequest(RouteCandidatesRequest {
            target_type: dst.r#type.clone(),
            criteria: None,
            client_location: None,
            client_fingerprint: "f".into(),
        })),
        7 => actr(P::GetServiceSpecRequest(GetServiceSpecRequest {
            name: "s".into(),
        })),
        8 => actr(P::SubscribeActrUpRequest(SubscribeActrUpRequest {
            target_type: dst.r#type.clone(),
        })),
        9 => actr(P::UnsubscribeActrUpRequest(UnsubscribeActrUpRequest {
            target_type: dst.r#type.clone(),
        })),
        10 => relay(actr_relay::Payload::SessionDescription(
            SessionDescription::default(),
        )),
        11 => relay(actr_relay::Payload::IceCandidate(IceCandidate::default())),
        12 => relay(actr_relay::Payload::RoleNegotiation(RoleNegotiation {
            from: src.clone(),
            to: dst.clone(),
            realm_id: 9,
        })),
        13 => relay(actr_relay::Payload::IceRestartRequest(
            IceRestartRequest::default(),
        )),
        14 => Some(signaling_envelope::Flow::EnvelopeError(
            ErrorResponse::default(),
        )),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), v in any::<u8>()) {
        let mut h = hub();
        h.handle_connect(0, ConnId(1), None, false);
        if let Ok(env) = SignalingEnvelope::decode(&bytes[..]) {
            h.handle_envelope(1000, ConnId(1), env, verdict(v, 1, 1, "x"), &mut Realms);
        }
        drain(&mut h);
    }

    #[test]
    fn random_well_formed_sequences_never_panic(
        steps in proptest::collection::vec(
            (0u64..4, any::<u8>(), 0u32..4, 0u64..4, 0u64..4, any::<u8>(), any::<bool>()),
            1..64,
        )
    ) {
        let mut h = hub();
        let names = ["x", "y", "z", "w"];
        let mut now = 1000u64;
        for (conn, kind, realm, s1, s2, v, churn) in steps {
            now += 1000;
            let c = ConnId(conn);
            if churn && kind % 5 == 0 {
                h.handle_disconnect(now, c);
                h.handle_connect(now, c, Some(id(realm, s1, names[s1 as usize])), kind % 2 == 0);
            } else if h.bound(c).is_none() && kind % 7 == 0 {
                h.handle_connect(now, c, None, false);
            }
            let src = h.bound(c).cloned().unwrap_or_else(|| id(realm, s1, names[s1 as usize]));
            let dst = id(if kind % 3 == 0 { realm + 1 } else { realm }, s2, names[s2 as usize]);
            if let Some(f) = flow(kind, src.clone(), dst) {
                let env = SignalingEnvelope {
                    envelope_version: 1,
                    envelope_id: format!("e{now}"),
                    flow: Some(f),
                    ..Default::default()
                };
                // Round-trip through the wire first.
                let env = SignalingEnvelope::decode(&env.encode_to_vec()[..]).unwrap();
                let vd = verdict(v, src.realm.realm_id, src.serial_number, &src.r#type.name);
                h.handle_envelope(now, c, env, vd, &mut Realms);
            }
            if kind % 11 == 0 {
                h.handle_timeout(now + 400_000);
            }
            drain(&mut h);
        }
    }
}

#[test]
fn relay_strips_the_credential_and_refuses_spoofing() {
    let mut h = hub();
    let x = id(1, 1, "x");
    let y = id(1, 2, "y");
    h.handle_connect(0, ConnId(1), Some(x.clone()), false);
    h.handle_connect(0, ConnId(2), Some(y.clone()), false);
    let cred = AIdCredential {
        encrypted_token: vec![1, 2, 3],
        token_key_id: 9,
    };
    let relay = |source: ActrId| SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "r".into(),
        flow: Some(signaling_envelope::Flow::ActrRelay(ActrRelay {
            source,
            credential: cred.clone(),
            target: y.clone(),
            payload: Some(actr_relay::Payload::SessionDescription(
                SessionDescription::default(),
            )),
        })),
        ..Default::default()
    };
    h.handle_envelope(
        1000,
        ConnId(1),
        relay(x.clone()),
        verdict(2, 1, 1, "x"),
        &mut Realms,
    );
    match h.poll_output() {
        Some(Output::Send { conn, envelope }) => {
            assert_eq!(conn, ConnId(2));
            let Some(signaling_envelope::Flow::ActrRelay(r)) = envelope.flow else {
                panic!()
            };
            assert!(r.credential.encrypted_token.is_empty() && r.credential.token_key_id == 0);
            assert!(envelope.reply_for.is_none());
        }
        o => panic!("{o:?}"),
    }
    // Connection 2 claims to be x with x's credential: refused, nothing relayed.
    h.handle_envelope(
        1000,
        ConnId(2),
        relay(x.clone()),
        verdict(2, 1, 1, "x"),
        &mut Realms,
    );
    match h.poll_output() {
        Some(Output::Send { conn, envelope }) => {
            assert_eq!(conn, ConnId(2));
            assert_eq!(envelope.reply_for.as_deref(), Some("r"));
        }
        o => panic!("{o:?}"),
    }
    assert!(h.poll_output().is_none());
}

#[test]
fn compatibility_analysis_levels() {
    let spec = |pk: &[(&str, &str)]| ServiceSpec {
        name: "s".into(),
        fingerprint: pk.iter().map(|(a, b)| format!("{a}{b}")).collect(),
        protobufs: pk
            .iter()
            .map(|(p, f)| service_spec::Protobuf {
                package: (*p).into(),
                content: String::new(),
                fingerprint: (*f).into(),
            })
            .collect(),
        ..Default::default()
    };
    let base = spec(&[("a.v1", "1")]);
    assert_eq!(
        analyze_compatibility(0, &base, &spec(&[("a.v1", "1")])).level,
        compat_level::FULLY_COMPATIBLE
    );
    assert_eq!(
        analyze_compatibility(0, &base, &spec(&[("a.v1", "1"), ("b.v1", "2")])).level,
        compat_level::BACKWARD_COMPATIBLE
    );
    let r = analyze_compatibility(0, &base, &spec(&[("a.v1", "9")]));
    assert_eq!(r.level, compat_level::BREAKING_CHANGES);
    assert_eq!(r.breaking_changes.len(), 1);
}

#[test]
fn subscriptions_of_a_departed_actor_go_with_its_eviction() {
    use actr_to_signaling::Payload as P;
    let mut h = hub();
    let (x, y) = (id(1, 1, "x"), id(1, 2, "y"));
    h.handle_connect(0, ConnId(1), Some(x.clone()), false);
    h.handle_connect(0, ConnId(2), Some(y.clone()), false);
    let subscribe = |src: &ActrId, name: &str| SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "s".into(),
        flow: Some(signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: src.clone(),
            credential: AIdCredential::default(),
            payload: Some(P::SubscribeActrUpRequest(SubscribeActrUpRequest {
                target_type: id(1, 9, name).r#type,
            })),
        })),
        ..Default::default()
    };
    h.handle_envelope(
        1000,
        ConnId(1),
        subscribe(&x, "z"),
        verdict(2, 1, 1, "x"),
        &mut Realms,
    );
    h.handle_envelope(
        1000,
        ConnId(2),
        subscribe(&y, "z"),
        verdict(2, 1, 2, "y"),
        &mut Realms,
    );
    drain(&mut h);
    assert_eq!(h.subscribers(), 2);
    // x leaves without unregistering; its subscription survives the disconnect...
    h.handle_disconnect(2000, ConnId(1));
    drain(&mut h);
    h.handle_timeout(3000);
    assert_eq!(h.subscribers(), 2);
    // ...but not the heartbeat eviction. y is still connected (it only stopped pinging) and
    // keeps its subscription.
    let later = 1000 * (SignalingConfig::default().heartbeat_timeout_secs + 10);
    h.handle_timeout(later);
    drain(&mut h);
    assert_eq!(h.subscribers(), 1);
}
