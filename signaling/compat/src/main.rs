//! The published Actrix runtime's own signaling client (`actr-runtime` 0.1.7,
//! `WebSocketSignalingClient`), unchanged, against a running appliance: two clients register,
//! heartbeat, ask for route candidates, refresh a credential, relay SDP and unregister. Every
//! call goes through the client's own request/response matching (`reply_for`), so an answer
//! the client cannot decode or match fails the run.
//!
//!     actr-runtime-client ws://127.0.0.1:8080/signaling/ws REALM_ID
//!
//! Exit status 0 when every step behaved; a failed step panics with what it got (status 101).

use actr_protocol as ap;
use actr_runtime::wire::webrtc::{
    ReconnectConfig, SignalingClient, SignalingConfig, WebSocketSignalingClient,
};
use std::time::Duration;

fn ap_type(name: &str) -> ap::ActrType {
    ap::ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
    }
}

async fn client(url: &str) -> WebSocketSignalingClient {
    let c = WebSocketSignalingClient::new(SignalingConfig {
        server_url: url.parse().unwrap(),
        connection_timeout: 5,
        heartbeat_interval: 30,
        reconnect_config: ReconnectConfig {
            enabled: false,
            ..ReconnectConfig::default()
        },
        auth_config: None,
    });
    c.connect().await.expect("the runtime's client connects");
    assert!(c.is_connected());
    c
}

async fn register(
    c: &WebSocketSignalingClient,
    realm: u32,
    me: &str,
    peer: &str,
) -> (ap::ActrId, ap::AIdCredential) {
    let req = ap::RegisterRequest {
        actr_type: ap_type(me),
        realm: ap::Realm { realm_id: realm },
        acl: Some(ap::Acl {
            rules: vec![ap::AclRule {
                principals: vec![ap::acl_rule::Principal {
                    realm: None,
                    actr_type: Some(ap_type(peer)),
                }],
                permission: ap::acl_rule::Permission::Allow as i32,
            }],
        }),
        ..Default::default()
    };
    let resp = c
        .send_register_request(req)
        .await
        .expect("a RegisterResponse the client matches to its request");
    match resp.result {
        Some(ap::register_response::Result::Success(ok)) => {
            assert_eq!(ok.actr_id.realm.realm_id, realm);
            assert_eq!(ok.actr_id.r#type, ap_type(me));
            assert_eq!(ok.psk.as_ref().map(|p| p.len()), Some(32));
            assert!(ok.signaling_heartbeat_interval_secs > 0);
            (ok.actr_id, ok.credential)
        }
        other => panic!("register refused: {other:?}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(realm)) = (args.next(), args.next()) else {
        eprintln!("usage: actr-runtime-client WS_URL REALM_ID");
        std::process::exit(2);
    };
    let realm: u32 = realm.parse().expect("REALM_ID is a number");
    let a = client(&url).await;
    let b = client(&url).await;
    let (a_id, a_cred) = register(&a, realm, "caller", "callee").await;
    let (b_id, b_cred) = register(&b, realm, "callee", "caller").await;
    assert_ne!(a_id.serial_number, b_id.serial_number);

    println!("ok: registered two actors");
    // Heartbeat: the client waits for the Pong that answers its Ping.
    let pong = a
        .send_heartbeat(
            a_id.clone(),
            a_cred.clone(),
            ap::ServiceAvailabilityState::Full,
            0.9,
            0.0,
        )
        .await
        .expect("a Pong");
    assert!(pong.seq > 0, "{pong:?}");
    b.send_heartbeat(
        b_id.clone(),
        b_cred.clone(),
        ap::ServiceAvailabilityState::Full,
        0.5,
        0.0,
    )
    .await
    .expect("a Pong for b");

    println!("ok: heartbeats answered");
    // Route candidates: the caller finds the callee (the callee's ACL allows it).
    let rc = a
        .send_route_candidates_request(
            a_id.clone(),
            a_cred.clone(),
            ap::RouteCandidatesRequest {
                target_type: ap_type("callee"),
                ..Default::default()
            },
        )
        .await
        .expect("route candidates");
    match rc.result {
        Some(ap::route_candidates_response::Result::Success(ok)) => {
            assert_eq!(ok.candidates, vec![b_id.clone()], "{ok:?}");
        }
        other => panic!("route candidates refused: {other:?}"),
    }

    println!("ok: route candidates found the callee");
    // Relay: the client sends the envelope as it builds it for WebRTC; the peer's client
    // hands it to its receiver, without the sender's credential.
    let offer = ap::SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "offer-1".into(),
        timestamp: ap::prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 0,
        },
        flow: Some(ap::signaling_envelope::Flow::ActrRelay(ap::ActrRelay {
            source: a_id.clone(),
            credential: a_cred.clone(),
            target: b_id.clone(),
            payload: Some(ap::actr_relay::Payload::SessionDescription(
                ap::SessionDescription {
                    r#type: ap::session_description::Type::Offer as i32,
                    sdp: "v=0 o=- 1 1 IN IP4 192.0.2.1".into(),
                },
            )),
        })),
        ..Default::default()
    };
    a.send_envelope(offer).await.expect("sent");
    let got = tokio::time::timeout(Duration::from_secs(5), b.receive_envelope())
        .await
        .expect("the relay within 5 s")
        .expect("receive")
        .expect("an envelope");
    match got.flow {
        Some(ap::signaling_envelope::Flow::ActrRelay(r)) => {
            assert_eq!(r.source, a_id);
            assert_eq!(r.target, b_id);
            assert!(r.credential.encrypted_token.is_empty());
            match r.payload {
                Some(ap::actr_relay::Payload::SessionDescription(s)) => {
                    assert_eq!(s.sdp, "v=0 o=- 1 1 IN IP4 192.0.2.1")
                }
                other => panic!("payload {other:?}"),
            }
        }
        other => panic!("expected the relay, got {other:?}"),
    }

    println!("ok: SDP relayed without the credential");
    // Credential refresh: a new credential that the hub accepts on the next request.
    let refreshed = a
        .send_credential_update_request(a_id.clone(), a_cred.clone())
        .await
        .expect("a RegisterResponse to the update");
    let new_cred = match refreshed.result {
        Some(ap::register_response::Result::Success(ok)) => {
            assert_eq!(ok.actr_id, a_id);
            ok.credential
        }
        other => panic!("credential update refused: {other:?}"),
    };
    a.send_heartbeat(
        a_id.clone(),
        new_cred.clone(),
        ap::ServiceAvailabilityState::Full,
        0.9,
        0.0,
    )
    .await
    .expect("a Pong with the refreshed credential");

    println!("ok: credential refreshed and accepted");
    // A credential naming someone else gets an error, which this client reports as an error.
    let spoofed = a
        .send_route_candidates_request(
            b_id.clone(),
            new_cred.clone(),
            ap::RouteCandidatesRequest {
                target_type: ap_type("callee"),
                ..Default::default()
            },
        )
        .await;
    assert!(spoofed.is_err(), "{spoofed:?}");

    println!("ok: spoofed source refused");
    // Unregister (fire and forget in this client): the callee disappears from discovery.
    b.send_unregister_request(b_id.clone(), b_cred, Some("shutdown".into()))
        .await
        .expect("sent");
    let mut gone = false;
    for _ in 0..50 {
        let rc = a
            .send_route_candidates_request(
                a_id.clone(),
                new_cred.clone(),
                ap::RouteCandidatesRequest {
                    target_type: ap_type("callee"),
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
