//! The published actr 0.4.21 client stack, unchanged, against a running appliance: two actors
//! register with the AIS (`actr_hyper::AisClient`, `POST /ais/register`), connect their
//! signaling clients (`actr_hyper::WebSocketSignalingClient`, identity and Ed25519 credential
//! in the URL), heartbeat, discover, ask for route candidates, fetch the AIS signing key,
//! relay SDP and ICE, renew a credential (`POST /ais/renew`, the replayed token refused),
//! relay TURN traffic with their `turn_credential` (webrtc-rs's TURN client, the one
//! actr-hyper's ICE agent uses) and unregister. Every signaling call goes through the
//! client's own request/response matching (`reply_for`), so an answer it cannot decode or
//! match fails the run.
//!
//!     actr04-client HTTP_BASE WS_URL REALM_ID TURN_ADDR
//!
//! Exit status 0 when every step behaved; a failed step panics with what it got (status 101).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actr_hyper::ais_client::{AisClient, RenewError};
use actr_hyper::wire::webrtc::{ReconnectConfig, SignalingClient, SignalingConfig};
use actr_hyper::{CredentialState, WebSocketSignalingClient};
use actr_protocol as ap;
use turn::client::{Client as TurnClient, ClientConfig};
use webrtc_util::Conn;

fn ap_type(name: &str) -> ap::ActrType {
    ap::ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
        version: "1.0.0".into(),
    }
}

async fn register(
    ais: &AisClient,
    realm: u32,
    me: &str,
    peer: &str,
) -> ap::register_response::RegisterOk {
    let req = ap::RegisterRequest {
        actr_type: ap_type(me),
        realm: ap::Realm { realm_id: realm },
        acl: Some(ap::Acl {
            rules: vec![ap::AclRule {
                permission: ap::acl_rule::Permission::Allow as i32,
                from_type: ap_type(peer),
                source_realm: Some(ap::acl_rule::SourceRealm::RealmId(realm)),
            }],
        }),
        auth_mode: Some(ap::RegisterAuthMode::Linked as i32),
        ..Default::default()
    };
    let resp = ais.register_linked(req).await.expect("the AIS answers");
    match resp.result {
        Some(ap::register_response::Result::Success(ok)) => {
            assert_eq!(ok.actr_id.realm.realm_id, realm);
            assert_eq!(ok.actr_id.r#type, ap_type(me));
            assert_eq!(ok.credential.signature.len(), 64);
            assert_eq!(ok.signing_pubkey.len(), 32);
            assert_eq!(ok.credential.key_id, ok.signing_key_id);
            let claims =
                <ap::IdentityClaims as ap::prost::Message>::decode(ok.credential.claims.as_ref())
                    .expect("plaintext claims");
            assert_eq!(claims.actor_id, ok.actr_id.to_string_repr());
            assert_eq!(
                ok.turn_credential.username,
                format!("{}:{}", claims.expires_at, claims.actor_id)
            );
            assert!(ok.renewal_token.as_ref().is_some_and(|t| !t.is_empty()));
            assert!(ok.signaling_heartbeat_interval_secs > 0);
            ok
        }
        other => panic!("register refused: {other:?}"),
    }
}

async fn connect(url: &str, ok: &ap::register_response::RegisterOk) -> WebSocketSignalingClient {
    let c = WebSocketSignalingClient::new(SignalingConfig {
        server_url: url.parse().unwrap(),
        connection_timeout: 5,
        heartbeat_interval: 30,
        reconnect_config: ReconnectConfig {
            enabled: false,
            ..ReconnectConfig::default()
        },
        auth_config: None,
        webrtc_role: None,
    });
    c.set_actor_id(ok.actr_id.clone()).await;
    c.set_credential_state(CredentialState::new(
        ok.credential.clone(),
        ok.credential_expires_at,
        Some(ok.turn_credential.clone()),
    ))
    .await;
    c.connect().await.expect("the runtime's client connects");
    assert!(c.is_connected());
    c
}

fn envelope(id: &str, flow: ap::signaling_envelope::Flow) -> ap::SignalingEnvelope {
    ap::SignalingEnvelope {
        envelope_version: 1,
        envelope_id: id.into(),
        timestamp: ap::prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 0,
        },
        flow: Some(flow),
        ..Default::default()
    }
}

/// The next envelope `c` hands its receiver.
async fn next(c: &WebSocketSignalingClient) -> ap::SignalingEnvelope {
    tokio::time::timeout(Duration::from_secs(5), c.receive_envelope())
        .await
        .expect("an envelope within 5 s")
        .expect("receive")
        .expect("an envelope")
}

async fn relayed(c: &WebSocketSignalingClient) -> ap::ActrRelay {
    loop {
        if let Some(ap::signaling_envelope::Flow::ActrRelay(r)) = next(c).await.flow {
            return r;
        }
    }
}

/// A TURN client of `cred` on the appliance at `turn`, with its allocation.
async fn allocate(turn: SocketAddr, cred: &ap::TurnCredential) -> (TurnClient, impl Conn) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = TurnClient::new(ClientConfig {
        stun_serv_addr: turn.to_string(),
        turn_serv_addr: turn.to_string(),
        username: cred.username.clone(),
        password: cred.password.clone(),
        realm: String::new(),
        software: "actr04-client".into(),
        rto_in_ms: 0,
        conn: Arc::new(sock),
        vnet: None,
    })
    .await
    .expect("TURN client");
    client.listen().await.expect("listen");
    let relay = client
        .allocate()
        .await
        .expect("an allocation with the turn_credential");
    (client, relay)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [http, ws, realm, turn] = args.as_slice() else {
        eprintln!("usage: actr04-client HTTP_BASE WS_URL REALM_ID TURN_ADDR");
        std::process::exit(2);
    };
    let realm: u32 = realm.parse().expect("REALM_ID is a number");
    let turn: SocketAddr = turn.parse().expect("TURN_ADDR is host:port");
    let ais = AisClient::new(format!("{}/ais", http.trim_end_matches('/')));

    let ra = register(&ais, realm, "caller", "callee").await;
    let rb = register(&ais, realm, "callee", "caller").await;
    assert_ne!(ra.actr_id.serial_number, rb.actr_id.serial_number);
    println!("ok: registered two actors with the AIS");

    let a = connect(ws, &ra).await;
    let b = connect(ws, &rb).await;
    println!("ok: signaling connected with the Ed25519 credential");

    let pong = a
        .send_heartbeat(
            ra.actr_id.clone(),
            ra.credential.clone(),
            ap::ServiceAvailabilityState::Full,
            0.9,
            0.0,
        )
        .await
        .expect("a Pong");
    assert!(pong.seq > 0, "{pong:?}");
    b.send_heartbeat(
        rb.actr_id.clone(),
        rb.credential.clone(),
        ap::ServiceAvailabilityState::Full,
        0.5,
        0.0,
    )
    .await
    .expect("a Pong for b");
    println!("ok: heartbeats answered");

    // Discovery (the client has no helper for it: its own envelope and receiver).
    a.send_envelope(envelope(
        "discover-1",
        ap::signaling_envelope::Flow::ActrToServer(ap::ActrToSignaling {
            source: ra.actr_id.clone(),
            credential: ra.credential.clone(),
            payload: Some(ap::actr_to_signaling::Payload::DiscoveryRequest(
                ap::DiscoveryRequest::default(),
            )),
        }),
    ))
    .await
    .expect("sent");
    loop {
        let e = next(&a).await;
        if e.reply_for.as_deref() != Some("discover-1") {
            continue;
        }
        match e.flow {
            Some(ap::signaling_envelope::Flow::ServerToActr(s)) => match s.payload {
                Some(ap::signaling_to_actr::Payload::DiscoveryResponse(
                    ap::DiscoveryResponse {
                        result: Some(ap::discovery_response::Result::Success(ok)),
                    },
                )) => {
                    let types: Vec<_> = ok.entries.iter().map(|e| e.actr_type.clone()).collect();
                    assert_eq!(types, vec![ap_type("callee")], "{ok:?}");
                }
                other => panic!("discovery refused: {other:?}"),
            },
            other => panic!("not a discovery answer: {other:?}"),
        }
        break;
    }
    println!("ok: discovery lists the 0.4 callee only");

    let rc = a
        .send_route_candidates_request(
            ra.actr_id.clone(),
            ra.credential.clone(),
            ap::RouteCandidatesRequest {
                target_type: ap_type("callee"),
                criteria: Some(ap::route_candidates_request::NodeSelectionCriteria {
                    candidate_count: 4,
                    ranking_factors: vec![
                        ap::route_candidates_request::node_selection_criteria::NodeRankingFactor::ExactMatchFirst
                            as i32,
                    ],
                    ..Default::default()
                }),
                client_fingerprint: String::new(),
                ..Default::default()
            },
        )
        .await
        .expect("route candidates");
    match rc.result {
        Some(ap::route_candidates_response::Result::Success(ok)) => {
            assert_eq!(ok.candidates, vec![rb.actr_id.clone()], "{ok:?}");
        }
        other => panic!("route candidates refused: {other:?}"),
    }
    println!("ok: route candidates found the 0.4 callee");

    let (key_id, pubkey) = a
        .get_signing_key(ra.actr_id.clone(), ra.credential.clone(), ra.signing_key_id)
        .await
        .expect("the signing key");
    assert_eq!(key_id, ra.signing_key_id);
    assert_eq!(pubkey, ra.signing_pubkey.to_vec());
    println!("ok: signing key fetched over signaling");

    // SDP and ICE, as the client relays them for WebRTC.
    let offer = envelope(
        "offer-1",
        ap::signaling_envelope::Flow::ActrRelay(ap::ActrRelay {
            source: ra.actr_id.clone(),
            credential: ra.credential.clone(),
            target: rb.actr_id.clone(),
            payload: Some(ap::actr_relay::Payload::SessionDescription(
                ap::SessionDescription {
                    r#type: ap::session_description::Type::Offer as i32,
                    sdp: "v=0 o=- 1 1 IN IP4 192.0.2.1".into(),
                    sdp_exchange_id: Some("exchange-1".into()),
                },
            )),
        }),
    );
    a.send_envelope(offer).await.expect("sent");
    let r = relayed(&b).await;
    assert_eq!(r.source, ra.actr_id);
    assert_eq!(r.target, rb.actr_id);
    assert!(r.credential.signature.is_empty() && r.credential.claims.is_empty());
    match r.payload {
        Some(ap::actr_relay::Payload::SessionDescription(s)) => {
            assert_eq!(s.sdp, "v=0 o=- 1 1 IN IP4 192.0.2.1");
            assert_eq!(s.sdp_exchange_id.as_deref(), Some("exchange-1"));
        }
        other => panic!("payload {other:?}"),
    }
    let ice = envelope(
        "ice-1",
        ap::signaling_envelope::Flow::ActrRelay(ap::ActrRelay {
            source: rb.actr_id.clone(),
            credential: rb.credential.clone(),
            target: ra.actr_id.clone(),
            payload: Some(ap::actr_relay::Payload::IceCandidate(ap::IceCandidate {
                candidate: "candidate:1 1 udp 2130706431 192.0.2.2 50000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
                username_fragment: None,
            })),
        }),
    );
    b.send_envelope(ice).await.expect("sent");
    match relayed(&a).await.payload {
        Some(ap::actr_relay::Payload::IceCandidate(c)) => {
            assert!(c.candidate.starts_with("candidate:1 "))
        }
        other => panic!("payload {other:?}"),
    }
    println!("ok: SDP and ICE relayed without the credential");

    // Renewal: the published client's AIS call; the new credential works on the open
    // connection; the used token is refused when replayed.
    let token = ra.renewal_token.clone().unwrap();
    let renewed = ais
        .renew_credential(ap::RenewCredentialRequest {
            actr_id: ra.actr_id.clone(),
            renewal_token: token.clone(),
        })
        .await
        .expect("renewed");
    let renewed = match renewed.result {
        Some(ap::renew_credential_response::Result::Success(ok)) => ok,
        other => panic!("renewal refused: {other:?}"),
    };
    assert_eq!(renewed.actr_id, ra.actr_id);
    assert_ne!(renewed.renewal_token.as_ref(), Some(&token));
    a.send_heartbeat(
        ra.actr_id.clone(),
        renewed.credential.clone(),
        ap::ServiceAvailabilityState::Full,
        0.9,
        0.0,
    )
    .await
    .expect("a Pong with the renewed credential");
    let replay = ais
        .renew_credential(ap::RenewCredentialRequest {
            actr_id: ra.actr_id.clone(),
            renewal_token: token,
        })
        .await;
    assert!(
        matches!(replay, Err(RenewError::TokenRejected)),
        "{replay:?}"
    );
    println!("ok: credential renewed, replayed renewal token refused");

    // A forged credential: the client reports the 401 as an expired credential.
    let mut forged = ra.credential.clone();
    let mut sig = forged.signature.to_vec();
    sig[0] ^= 0xff;
    forged.signature = sig.into();
    let refused = a
        .send_heartbeat(
            ra.actr_id.clone(),
            forged,
            ap::ServiceAvailabilityState::Full,
            0.9,
            0.0,
        )
        .await;
    assert!(
        matches!(refused, Err(actr_hyper::NetworkError::CredentialExpired(_))),
        "{refused:?}"
    );
    println!("ok: forged credential refused");

    // TURN with the turn_credentials: each actor allocates, and data goes from one relayed
    // address to the other through the appliance.
    let (ta, relay_a) = allocate(turn, &renewed.turn_credential).await;
    let (tb, relay_b) = allocate(turn, &rb.turn_credential).await;
    let addr_a = relay_a.local_addr().unwrap();
    let addr_b = relay_b.local_addr().unwrap();
    // Permissions both ways (the client installs one when it first sends to a peer).
    relay_b
        .send_to(b"hello a", addr_a)
        .await
        .expect("send b->a");
    let mut buf = [0u8; 1500];
    let mut got = None;
    for _ in 0..20 {
        relay_a
            .send_to(b"turn data", addr_b)
            .await
            .expect("send a->b");
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(250), relay_b.recv_from(&mut buf)).await
        {
            got = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    let (data, from) = got.expect("relayed TURN data");
    assert_eq!(data, b"turn data");
    assert_eq!(from, addr_a);
    println!("ok: TURN data relayed with the turn_credentials");
    let _ = relay_a.close().await;
    let _ = relay_b.close().await;
    let _ = ta.close().await;
    let _ = tb.close().await;

    b.send_unregister_request(
        rb.actr_id.clone(),
        rb.credential.clone(),
        Some("bye".into()),
    )
    .await
    .expect("sent");
    let mut gone = false;
    for _ in 0..50 {
        let rc = a
            .send_route_candidates_request(
                ra.actr_id.clone(),
                renewed.credential.clone(),
                ap::RouteCandidatesRequest {
                    target_type: ap_type("callee"),
                    client_fingerprint: String::new(),
                    ..Default::default()
                },
            )
            .await
            .expect("route candidates");
        if let Some(ap::route_candidates_response::Result::Success(ok)) = rc.result {
            if ok.candidates.is_empty() {
                gone = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the unregistered callee is no longer a candidate");
    println!("ok: unregistered callee gone from route candidates");
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
    println!("ok: all steps");
}
