//! actr 0.4 clients and 0.1.7 clients on one node, over real WebSockets (control/WIRE-0.4.md):
//! 0.4 actors register with the AIS (in-process, the function behind `POST /ais/register`),
//! connect with their Ed25519 credential in the URL, heartbeat, discover, relay SDP with its
//! exchange id and fetch signing keys; the two protocols never see each other; forged,
//! expired and wrongly keyed credentials and credentials of the other protocol are refused
//! with their codes and nothing is relayed.
// Tests wait on the wall clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use actrix_signaling::proto as p1;
use actrix_wire::v4::{actr as a4, signaling as s4, webrtc as w4};
use base64::Engine as _;
use common::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

fn t4(name: &str) -> a4::ActrType {
    a4::ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
        version: "1.0.0".into(),
    }
}

fn id_string(id: &a4::ActrId) -> String {
    format!(
        "{:x}@{}/{}:{}:{}",
        id.serial_number,
        id.realm.realm_id,
        id.r#type.manufacturer,
        id.r#type.name,
        id.r#type.version
    )
}

/// Register through the AIS as `POST /ais/register` does, with an ACL allowing `from`.
fn register4(srv: &Server, name: &str, from: &[&str]) -> a4::register_response::RegisterOk {
    let req = a4::RegisterRequest {
        actr_type: t4(name),
        realm: a4::Realm { realm_id: REALM },
        acl: Some(a4::Acl {
            rules: from
                .iter()
                .map(|f| a4::AclRule {
                    permission: a4::acl_rule::Permission::Allow as i32,
                    from_type: t4(f),
                    source_realm: None,
                })
                .collect(),
        }),
        ws_address: Some(format!("ws://10.0.0.1/{name}")),
        auth_mode: Some(a4::RegisterAuthMode::Linked as i32),
        ..Default::default()
    };
    let ais = srv.ctx.ais.as_ref().expect("AIS");
    match ais.register_v4(&req.encode_to_vec()).result {
        Some(a4::register_response::Result::Success(ok)) => ok,
        other => panic!("register: {other:?}"),
    }
}

fn url_query(id: &a4::ActrId, cred: &a4::AIdCredential) -> String {
    let b = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    form_query(&[
        ("actor_id", id_string(id)),
        ("key_id", cred.key_id.to_string()),
        ("claims", b(&cred.claims)),
        ("signature", b(&cred.signature)),
    ])
}

struct Client4 {
    ws: Ws,
    id: a4::ActrId,
    cred: a4::AIdCredential,
    seq: u64,
    pending: Vec<s4::SignalingEnvelope>,
}

impl Client4 {
    async fn connect(srv: &Server, ok: &a4::register_response::RegisterOk) -> Client4 {
        let url = srv.url(&url_query(&ok.actr_id, &ok.credential));
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client4 {
            ws,
            id: ok.actr_id.clone(),
            cred: ok.credential.clone(),
            seq: 0,
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, flow: s4::signaling_envelope::Flow) -> String {
        self.seq += 1;
        let id = format!("v4-{}", self.seq);
        let env = s4::SignalingEnvelope {
            envelope_version: 1,
            envelope_id: id.clone(),
            timestamp: prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            },
            flow: Some(flow),
            ..Default::default()
        };
        self.send_raw(env.encode_to_vec()).await;
        id
    }

    async fn send_raw(&mut self, b: Vec<u8>) {
        self.ws.send(Message::Binary(b.into())).await.unwrap();
    }

    async fn recv_timeout(&mut self, t: Duration) -> Option<s4::SignalingEnvelope> {
        if !self.pending.is_empty() {
            return Some(self.pending.remove(0));
        }
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match m.ok()? {
                Message::Binary(b) => {
                    return Some(s4::SignalingEnvelope::decode(b).expect("a 0.4 envelope"))
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    async fn request(&mut self, flow: s4::signaling_envelope::Flow) -> s4::SignalingEnvelope {
        let id = self.send(flow).await;
        loop {
            let e = self
                .recv_timeout(Duration::from_secs(5))
                .await
                .expect("a reply");
            if e.reply_for.as_deref() == Some(id.as_str()) {
                return e;
            }
            self.pending.push(e);
        }
    }

    fn actr(
        &self,
        cred: &a4::AIdCredential,
        p: s4::actr_to_signaling::Payload,
    ) -> s4::signaling_envelope::Flow {
        s4::signaling_envelope::Flow::ActrToServer(s4::ActrToSignaling {
            source: self.id.clone(),
            credential: cred.clone(),
            payload: Some(p),
        })
    }

    fn ping(&self, cred: &a4::AIdCredential) -> s4::signaling_envelope::Flow {
        self.actr(
            cred,
            s4::actr_to_signaling::Payload::Ping(a4::Ping {
                availability: 0,
                power_reserve: 1.0,
                mailbox_backlog: 0.0,
                sticky_client_ids: vec![],
            }),
        )
    }

    fn route(&self, target: &str) -> s4::signaling_envelope::Flow {
        self.actr(
            &self.cred,
            s4::actr_to_signaling::Payload::RouteCandidatesRequest(a4::RouteCandidatesRequest {
                target_type: t4(target),
                client_fingerprint: String::new(),
                ..Default::default()
            }),
        )
    }

    fn sdp(&self, target: &a4::ActrId, text: &str) -> s4::signaling_envelope::Flow {
        s4::signaling_envelope::Flow::ActrRelay(s4::ActrRelay {
            source: self.id.clone(),
            credential: self.cred.clone(),
            target: target.clone(),
            payload: Some(s4::actr_relay::Payload::SessionDescription(
                w4::SessionDescription {
                    r#type: 0,
                    sdp: text.into(),
                    sdp_exchange_id: Some(format!("x-{text}")),
                },
            )),
        })
    }
}

fn payload(e: &s4::SignalingEnvelope) -> &s4::signaling_to_actr::Payload {
    match &e.flow {
        Some(s4::signaling_envelope::Flow::ServerToActr(s)) => s.payload.as_ref().unwrap(),
        other => panic!("not server_to_actr: {other:?}"),
    }
}

fn error4(e: &s4::SignalingEnvelope) -> (u32, String) {
    match payload(e) {
        s4::signaling_to_actr::Payload::Error(er) => (er.code, er.message.clone()),
        other => panic!("not an error: {other:?}"),
    }
}

fn candidates(e: &s4::SignalingEnvelope) -> a4::route_candidates_response::RouteCandidatesOk {
    match payload(e) {
        s4::signaling_to_actr::Payload::RouteCandidatesResponse(a4::RouteCandidatesResponse {
            result: Some(a4::route_candidates_response::Result::Success(ok)),
        }) => ok.clone(),
        other => panic!("not route candidates: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn actr_0_4_and_0_1_7_clients_share_a_node_without_meeting() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), test_config());
    let ra = register4(&srv, "caller", &["callee"]);
    let rb = register4(&srv, "callee", &["caller"]);
    let mut a = Client4::connect(&srv, &ra).await;
    let mut b = Client4::connect(&srv, &rb).await;

    // Heartbeat.
    let pong = a.request(a.ping(&a.cred.clone())).await;
    assert!(matches!(payload(&pong), s4::signaling_to_actr::Payload::Pong(p) if p.seq > 0));

    // A 0.1.7 callee on the same node, in the same realm, with an ACL allowing the caller.
    let mut c = Client::connect(&srv.url("")).await;
    let c_id = c.register("callee", &["caller"]).await;
    let mut old_caller = Client::connect(&srv.url("")).await;
    old_caller.register("caller", &["callee"]).await;

    // Route candidates from the 0.4 caller: the 0.4 callee only, with its address (0.4 layout).
    let ok = candidates(&a.request(a.route("callee")).await);
    assert_eq!(ok.candidates, vec![rb.actr_id.clone()]);
    assert_eq!(ok.ws_address_map.len(), 1);
    assert_eq!(
        ok.ws_address_map[0].ws_address.as_deref(),
        Some("ws://10.0.0.1/callee")
    );
    // And from the 0.1.7 caller: the 0.1.7 callee only.
    let reply = old_caller
        .request(
            old_caller.actr(p1::actr_to_signaling::Payload::RouteCandidatesRequest(
                p1::RouteCandidatesRequest {
                    target_type: actr_type("callee"),
                    ..Default::default()
                },
            )),
        )
        .await;
    match to_actr(&reply) {
        p1::signaling_to_actr::Payload::RouteCandidatesResponse(p1::RouteCandidatesResponse {
            result: Some(p1::route_candidates_response::Result::Success(ok)),
        }) => assert_eq!(ok.candidates, vec![c_id.clone()]),
        other => panic!("{other:?}"),
    }

    // SDP relay between the 0.4 actors, exchange id kept, sender's credential not forwarded.
    a.send(a.sdp(&rb.actr_id, "offer")).await;
    let got = b
        .recv_timeout(Duration::from_secs(5))
        .await
        .expect("the relay");
    match got.flow {
        Some(s4::signaling_envelope::Flow::ActrRelay(r)) => {
            assert_eq!(r.source, ra.actr_id);
            assert_eq!(r.credential, a4::AIdCredential::default());
            match r.payload {
                Some(s4::actr_relay::Payload::SessionDescription(sd)) => {
                    assert_eq!(sd.sdp, "offer");
                    assert_eq!(sd.sdp_exchange_id.as_deref(), Some("x-offer"));
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    // A relay to the 0.1.7 callee goes nowhere (silent, like an absent target).
    let before = srv
        .stats
        .relays_no_target
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut c_as_4 = rb.actr_id.clone();
    c_as_4.serial_number = c_id.serial_number;
    a.send(a.sdp(&c_as_4, "cross")).await;
    c.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        srv.stats
            .relays_no_target
            .load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );

    // The signing key, over signaling.
    let reply = a
        .request(a.actr(
            &a.cred.clone(),
            s4::actr_to_signaling::Payload::GetSigningKeyRequest(s4::GetSigningKeyRequest {
                key_id: ra.signing_key_id,
            }),
        ))
        .await;
    match payload(&reply) {
        s4::signaling_to_actr::Payload::GetSigningKeyResponse(k) => {
            assert_eq!(k.key_id, ra.signing_key_id);
            assert_eq!(k.pubkey, ra.signing_pubkey);
        }
        other => panic!("{other:?}"),
    }
    let reply = a
        .request(a.actr(
            &a.cred.clone(),
            s4::actr_to_signaling::Payload::GetSigningKeyRequest(s4::GetSigningKeyRequest {
                key_id: 9999,
            }),
        ))
        .await;
    assert_eq!(error4(&reply).0, 404);

    // Discovery lists 0.4 types only.
    let reply = a
        .request(a.actr(
            &a.cred.clone(),
            s4::actr_to_signaling::Payload::DiscoveryRequest(a4::DiscoveryRequest::default()),
        ))
        .await;
    match payload(&reply) {
        s4::signaling_to_actr::Payload::DiscoveryResponse(a4::DiscoveryResponse {
            result: Some(a4::discovery_response::Result::Success(ok)),
        }) => {
            let names: Vec<_> = ok
                .entries
                .iter()
                .map(|e| e.actr_type.name.clone())
                .collect();
            assert_eq!(names, vec!["callee".to_owned()], "{ok:?}");
        }
        other => panic!("{other:?}"),
    }

    // A renewed credential (same ActrId) is accepted on the same connection.
    let ais = srv.ctx.ais.as_ref().unwrap();
    let renewed = match ais
        .renew_v4(
            &a4::RenewCredentialRequest {
                actr_id: ra.actr_id.clone(),
                renewal_token: ra.renewal_token.clone().unwrap(),
            }
            .encode_to_vec(),
        )
        .result
    {
        Some(a4::renew_credential_response::Result::Success(ok)) => ok,
        other => panic!("{other:?}"),
    };
    let pong = a.request(a.ping(&renewed.credential)).await;
    assert!(matches!(
        payload(&pong),
        s4::signaling_to_actr::Payload::Pong(_)
    ));
}

#[tokio::test(flavor = "current_thread")]
async fn bad_0_4_credentials_and_the_other_protocol_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), test_config());
    let ra = register4(&srv, "caller", &["callee"]);
    let rb = register4(&srv, "callee", &["caller"]);
    let mut a = Client4::connect(&srv, &ra).await;
    let mut b = Client4::connect(&srv, &rb).await;
    let keys = srv
        .ctx
        .ais
        .as_ref()
        .unwrap()
        .signing_keys()
        .unwrap()
        .clone();

    // Forged claims (another actor id, the original signature).
    let mut forged = a.cred.clone();
    let mut claims = a4::IdentityClaims::decode(&forged.claims[..]).unwrap();
    claims.actor_id = id_string(&rb.actr_id);
    forged.claims = claims.encode_to_vec();
    let e = a.request(a.ping(&forged)).await;
    assert_eq!(
        error4(&e),
        (
            401,
            "Credential validation failed: invalid signature".into()
        )
    );
    // Expired claims, correctly signed.
    let mut expired = a4::IdentityClaims::decode(&a.cred.claims[..]).unwrap();
    expired.expires_at = 1_000;
    let bytes = expired.encode_to_vec();
    let expired_cred = a4::AIdCredential {
        key_id: a.cred.key_id,
        signature: keys.sign(a.cred.key_id, &bytes).unwrap().to_vec(),
        claims: bytes,
    };
    let e = a.request(a.ping(&expired_cred)).await;
    assert_eq!(
        error4(&e),
        (
            401,
            "Credential validation failed: credential expired".into()
        )
    );
    // A key id no signing key has.
    let mut wrong_key = a.cred.clone();
    wrong_key.key_id += 1000;
    let e = a.request(a.ping(&wrong_key)).await;
    assert_eq!(
        error4(&e),
        (
            401,
            "Credential validation failed: unknown signing key id".into()
        )
    );
    // A relay with a forged credential is refused and nothing reaches the target.
    let mut relay = a.sdp(&rb.actr_id, "forged");
    if let s4::signaling_envelope::Flow::ActrRelay(r) = &mut relay {
        r.credential = forged.clone();
    }
    let e = a.request(relay).await;
    assert_eq!(error4(&e).0, 401);
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_none());

    // A 0.1.7 credential on the 0.4 connection: 401, the connection stays, nothing relayed.
    let mut old = Client::connect(&srv.url("")).await;
    old.register("caller", &["callee"]).await;
    let v1_env = envelope(
        "cross-1".into(),
        p1::signaling_envelope::Flow::ActrRelay(p1::ActrRelay {
            source: actrix_signaling::proto::parse_actr_id(&id_string(&ra.actr_id)).unwrap(),
            credential: old.cred.clone().unwrap(),
            target: actrix_signaling::proto::parse_actr_id(&id_string(&rb.actr_id)).unwrap(),
            payload: Some(sdp("cross")),
        }),
    );
    a.send_raw(v1_env.encode_to_vec()).await;
    let e = a
        .recv_timeout(Duration::from_secs(5))
        .await
        .expect("a reply");
    assert_eq!(e.reply_for.as_deref(), Some("cross-1"));
    assert_eq!(
        error4(&e),
        (
            401,
            "Credential validation failed: an actr 0.1.7 credential on an actr 0.4 connection"
                .into()
        )
    );
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_none());
    let pong = a.request(a.ping(&a.cred.clone())).await;
    assert!(matches!(
        payload(&pong),
        s4::signaling_to_actr::Payload::Pong(_)
    ));

    // The reverse: a 0.4 envelope with its credential on the 0.1.7 connection.
    let mut v4_env = a.sdp(&rb.actr_id, "reverse");
    if let s4::signaling_envelope::Flow::ActrRelay(r) = &mut v4_env {
        r.source = a4::ActrId::decode(&old.id.as_ref().unwrap().encode_to_vec()[..]).unwrap();
    }
    let env = s4::SignalingEnvelope {
        envelope_version: 1,
        envelope_id: "cross-2".into(),
        flow: Some(v4_env),
        ..Default::default()
    };
    old.send_raw(env.encode_to_vec()).await;
    let e = old.recv().await;
    assert_eq!(e.reply_for.as_deref(), Some("cross-2"));
    assert_eq!(
        error_code(&e),
        Some((
            401,
            "Credential validation failed: an actr 0.4 credential on an actr 0.1.7 connection"
                .into()
        ))
    );
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        srv.stats
            .wrong_protocol
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // A URL identity with forged claims binds nothing: the connection's requests are refused.
    let url = srv.url(&url_query(&ra.actr_id, &forged));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut f = Client4 {
        ws,
        id: ra.actr_id.clone(),
        cred: ra.credential.clone(),
        seq: 0,
        pending: Vec::new(),
    };
    let e = f.request(f.ping(&ra.credential.clone())).await;
    assert_eq!(
        error4(&e),
        (
            403,
            "Source identity mismatch: connection is not bound to source".into()
        )
    );
    // Registration on a 0.4 connection is refused (0.4 registers over HTTP).
    let e = f
        .request(s4::signaling_envelope::Flow::PeerToServer(
            s4::PeerToSignaling {
                payload: Some(s4::peer_to_signaling::Payload::RegisterRequest(
                    a4::RegisterRequest::default(),
                )),
            },
        ))
        .await;
    match payload(&e) {
        s4::signaling_to_actr::Payload::RegisterResponse(a4::RegisterResponse {
            result: Some(a4::register_response::Result::Error(er)),
        }) => assert_eq!(er.code, 400),
        other => panic!("{other:?}"),
    }
}
