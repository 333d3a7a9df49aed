//! Wire compatibility with the published Actrix message types (`actr-protocol` 0.1.7, the
//! crate actr clients are built on): a client speaking only those types registers through the
//! hub, relays SDP to another, and decodes every answer; and envelopes of every flow encoded
//! by either side decode to the same bytes on the other.

// Tests drive real servers in real time; the purity rule of clippy.toml is the hub's.
#![allow(clippy::disallowed_methods)]

mod common;

use actr_protocol as ap;
use common::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type ApWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ap_type(name: &str) -> ap::ActrType {
    ap::ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
    }
}

fn ap_envelope(id: &str, flow: ap::signaling_envelope::Flow) -> Vec<u8> {
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
    .encode_to_vec()
}

async fn ap_recv(ws: &mut ApWs) -> ap::SignalingEnvelope {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an envelope within 5 s")
            .expect("open")
            .expect("ws");
        if let Message::Binary(b) = m {
            return ap::SignalingEnvelope::decode(b)
                .expect("actr-protocol decodes the hub's envelope");
        }
    }
}

async fn ap_register(url: &str, me: &str, peer: &str) -> (ApWs, ap::ActrId, ap::AIdCredential) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let req = ap::RegisterRequest {
        actr_type: ap_type(me),
        realm: ap::Realm { realm_id: REALM },
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
    let bytes = ap_envelope(
        "reg-1",
        ap::signaling_envelope::Flow::PeerToServer(ap::PeerToSignaling {
            payload: Some(ap::peer_to_signaling::Payload::RegisterRequest(req)),
        }),
    );
    ws.send(Message::Binary(bytes.into())).await.unwrap();
    loop {
        let env = ap_recv(&mut ws).await;
        if let Some(ap::signaling_envelope::Flow::ServerToActr(ap::SignalingToActr {
            payload: Some(ap::signaling_to_actr::Payload::RegisterResponse(r)),
            ..
        })) = env.flow
        {
            assert_eq!(env.reply_for.as_deref(), Some("reg-1"));
            assert_eq!(env.envelope_version, 1);
            assert!(!env.envelope_id.is_empty());
            match r.result {
                Some(ap::register_response::Result::Success(ok)) => {
                    assert_eq!(ok.actr_id.realm.realm_id, REALM);
                    assert_eq!(ok.actr_id.r#type, ap_type(me));
                    assert_eq!(ok.psk.as_ref().map(|p| p.len()), Some(32));
                    return (ws, ok.actr_id, ok.credential);
                }
                other => panic!("register refused: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_client_speaking_actr_protocol_0_1_7_registers_and_relays() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), test_config());
    let url = srv.url("");
    let (mut a, a_id, a_cred) = ap_register(&url, "caller", "callee").await;
    let (mut b, b_id, _) = ap_register(&url, "callee", "caller").await;
    assert_ne!(a_id.serial_number, b_id.serial_number);

    let relay = ap::ActrRelay {
        source: a_id.clone(),
        credential: a_cred.clone(),
        target: b_id.clone(),
        payload: Some(ap::actr_relay::Payload::SessionDescription(
            ap::SessionDescription {
                r#type: ap::session_description::Type::Offer as i32,
                sdp: "v=0 o=- 1 1 IN IP4 192.0.2.1".into(),
            },
        )),
    };
    let bytes = ap_envelope("sdp-1", ap::signaling_envelope::Flow::ActrRelay(relay));
    a.send(Message::Binary(bytes.into())).await.unwrap();
    let env = ap_recv(&mut b).await;
    match env.flow {
        Some(ap::signaling_envelope::Flow::ActrRelay(r)) => {
            assert_eq!(r.source, a_id);
            assert_eq!(r.target, b_id);
            assert!(
                r.credential.encrypted_token.is_empty(),
                "the sender's credential is not passed on"
            );
            match r.payload {
                Some(ap::actr_relay::Payload::SessionDescription(s)) => {
                    assert_eq!(s.sdp, "v=0 o=- 1 1 IN IP4 192.0.2.1");
                    assert_eq!(s.r#type, ap::session_description::Type::Offer as i32);
                }
                other => panic!("payload {other:?}"),
            }
        }
        other => panic!("expected the relay, got {other:?}"),
    }
    // A spoofed source (b's id with a's credential) is refused with an error the client
    // decodes.
    let spoof = ap::ActrRelay {
        source: b_id.clone(),
        credential: a_cred,
        target: a_id.clone(),
        payload: Some(ap::actr_relay::Payload::SessionDescription(
            ap::SessionDescription {
                r#type: ap::session_description::Type::Answer as i32,
                sdp: "x".into(),
            },
        )),
    };
    let bytes = ap_envelope("spoof-1", ap::signaling_envelope::Flow::ActrRelay(spoof));
    a.send(Message::Binary(bytes.into())).await.unwrap();
    let env = ap_recv(&mut a).await;
    match env.flow {
        Some(ap::signaling_envelope::Flow::ServerToActr(ap::SignalingToActr {
            payload: Some(ap::signaling_to_actr::Payload::Error(e)),
            ..
        })) => {
            assert_eq!(env.reply_for.as_deref(), Some("spoof-1"));
            assert_eq!(e.code, 403, "{}", e.message);
        }
        other => panic!("expected an error response, got {other:?}"),
    }
    // Nothing reached the spoofed target.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.next())
            .await
            .is_err(),
        "b received nothing"
    );
}

#[test]
fn envelopes_of_every_relay_kind_round_trip_byte_for_byte() {
    use actrix_signaling::proto as ours;
    let id = |serial| ap::ActrId {
        realm: ap::Realm { realm_id: 7 },
        serial_number: serial,
        r#type: ap_type("t"),
    };
    let cred = ap::AIdCredential {
        encrypted_token: vec![1u8, 2, 3, 4].into(),
        token_key_id: 9,
    };
    let payloads = vec![
        ap::actr_relay::Payload::SessionDescription(ap::SessionDescription {
            r#type: ap::session_description::Type::Answer as i32,
            sdp: "v=0".into(),
        }),
        ap::actr_relay::Payload::IceCandidate(ap::IceCandidate {
            candidate: "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: Some("abcd".into()),
        }),
    ];
    for p in payloads {
        let theirs = ap_envelope(
            "e-1",
            ap::signaling_envelope::Flow::ActrRelay(ap::ActrRelay {
                source: id(1),
                credential: cred.clone(),
                target: id(2),
                payload: Some(p),
            }),
        );
        let decoded = ours::SignalingEnvelope::decode(&theirs[..]).expect("ours decodes theirs");
        let again = decoded.encode_to_vec();
        assert_eq!(again, theirs, "every field survives our decode and encode");
        let back = ap::SignalingEnvelope::decode(&again[..]).expect("theirs decodes ours");
        assert_eq!(back.encode_to_vec(), theirs);
    }
}
