//! The appliance as a whole: an actor registers over the signaling WebSocket, and the
//! credential it gets back allocates and relays on the TURN data plane; /metrics counts the
//! registration.

mod common;

use actrix_control::{provision_realm, Realm, RealmStatus};
use actrix_proto::stun::attr;
use actrix_signaling::proto::{
    actr_to_signaling, peer_to_signaling, register_response, signaling_envelope, signaling_to_actr,
    ActrToSignaling, ActrType, PeerToSignaling, Ping, RegisterRequest, SignalingEnvelope,
    Timestamp,
};

use common::{Appliance, TurnClient};
use prost::Message as _;

#[test]
fn register_over_websocket_then_allocate_with_the_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    provision_realm(
        &data,
        &Realm {
            realm_id: 7,
            name: "edge".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .unwrap();
    let app = Appliance::start(tmp.path(), "[turn]\nallow_peers = [\"127.0.0.0/8\"]\n");

    let (mut ws, _) =
        tungstenite::connect(format!("ws://{}/signaling/ws", app.http)).expect("upgrade");
    let env = SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "req-1".into(),
        timestamp: Timestamp {
            seconds: 0,
            nanos: 0,
        },
        flow: Some(signaling_envelope::Flow::PeerToServer(PeerToSignaling {
            payload: Some(peer_to_signaling::Payload::RegisterRequest(
                RegisterRequest {
                    actr_type: ActrType {
                        manufacturer: "acme".into(),
                        name: "echo".into(),
                        version: Some("1.0.0".into()),
                    },
                    realm: actrix_signaling::proto::Realm { realm_id: 7 },
                    ..Default::default()
                },
            )),
        })),
        ..Default::default()
    };
    ws.send(tungstenite::Message::Binary(env.encode_to_vec().into()))
        .unwrap();
    let reply = loop {
        match ws.read().expect("reply") {
            tungstenite::Message::Binary(b) => break SignalingEnvelope::decode(&b[..]).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(reply.reply_for.as_deref(), Some("req-1"));
    let Some(signaling_envelope::Flow::ServerToActr(to)) = reply.flow else {
        panic!("{reply:?}")
    };
    let Some(signaling_to_actr::Payload::RegisterResponse(resp)) = to.payload else {
        panic!()
    };
    let Some(register_response::Result::Success(ok)) = resp.result else {
        panic!("{resp:?}")
    };

    let mut raw = Vec::new();
    raw.extend_from_slice(&7u32.to_be_bytes());
    raw.extend_from_slice(&ok.credential.token_key_id.to_be_bytes());
    raw.extend_from_slice(&ok.credential.encrypted_token);
    let username = actrix_control::crypto::base122_encode(&raw);
    let password = hex::encode(ok.psk.expect("psk"));
    let mut c = TurnClient::new(app.stun, &username, password.as_bytes(), "actor-rtc.local");
    let r = c.allocate(10).expect("allocate answered");
    assert_eq!(r.code(), None, "the signaling credential allocates on TURN");
    assert!(r.msg().get_xor_addr(attr::XOR_RELAYED_ADDRESS).is_some());

    // A Ping is answered synchronously by the hub: its Pong is timed from the Ping's arrival
    // to the Pong written (actrix_signaling_forward_latency_seconds).
    let ping = SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "ping-1".into(),
        flow: Some(signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: ok.actr_id.clone(),
            credential: ok.credential.clone(),
            payload: Some(actr_to_signaling::Payload::Ping(Ping {
                availability: 1,
                power_reserve: 1.0,
                mailbox_backlog: 0.0,
                sticky_client_ids: vec![],
            })),
        })),
        ..Default::default()
    };
    ws.send(tungstenite::Message::Binary(ping.encode_to_vec().into()))
        .unwrap();
    let pong = loop {
        match ws.read().expect("pong") {
            tungstenite::Message::Binary(b) => break SignalingEnvelope::decode(&b[..]).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(pong.reply_for.as_deref(), Some("ping-1"), "{pong:?}");
    let Some(signaling_envelope::Flow::ServerToActr(to)) = pong.flow else {
        panic!("{pong:?}")
    };
    assert!(
        matches!(to.payload, Some(signaling_to_actr::Payload::Pong(_))),
        "{to:?}"
    );

    let body = ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    // The registration answer comes back from AIS asynchronously and is not timed; the Pong is.
    let count: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("actrix_signaling_forward_latency_seconds_count "))
        .unwrap_or_else(|| panic!("no forward latency histogram: {body}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(count, 1, "{body}");
    assert!(
        body.contains("actrix_signaling_forward_latency_seconds_bucket{le=\"+Inf\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("actrix_signaling_registrations_total 1"),
        "{body}"
    );
    assert!(
        body.contains("actrix_signaling_connections_open 1"),
        "{body}"
    );
}
