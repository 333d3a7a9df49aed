//! End-to-end tests over real WebSocket connections against a real control server.

// Tests drive real servers in real time; the purity rule of clippy.toml is the hub's.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use actrix_control::ais::IdentityClaims;
use actrix_control::crypto;
use actrix_signaling::proto::*;
use common::*;
use prost::Message as _;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test]
async fn health_route() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let body = tokio::task::spawn_blocking({
        let addr = srv.addr;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /signaling/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        }
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("Signaling is healthy"), "{body}");
}

#[tokio::test]
async fn register_issues_a_valid_credential() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let mut a = Client::connect(&srv.url("")).await;
    let reply = a
        .register_full(REALM, actr_type("echo"), None, None, None)
        .await;
    assert_eq!(reply.envelope_version, 1);
    assert_eq!(reply.envelope_id.len(), 36, "UUID v4");
    assert_eq!(reply.timestamp.nanos, 0);
    assert!(reply.timestamp.seconds > 1_700_000_000);
    let Some(register_response::Result::Success(ok)) = register_result(&reply) else {
        panic!("{reply:?}")
    };
    let SignalingToActr { target, .. } = match &reply.flow {
        Some(signaling_envelope::Flow::ServerToActr(s)) => s.clone(),
        _ => unreachable!(),
    };
    assert_eq!(target, ok.actr_id);
    assert_eq!(ok.actr_id.realm.realm_id, REALM);
    assert_eq!(ok.psk.as_ref().map(Vec::len), Some(32));
    assert!(ok.credential_expires_at.is_some());
    // The token decrypts with the KS secret and names this actor.
    let rec = srv.ctx.keys.secret(ok.credential.token_key_id).unwrap();
    let plain = crypto::ecies_decrypt(&rec.secret_key[..], &ok.credential.encrypted_token).unwrap();
    let claims: IdentityClaims = serde_json::from_slice(&plain).unwrap();
    assert_eq!(claims.actor_id, actr_id_string(&ok.actr_id));
    assert_eq!(claims.realm_id, REALM);
    assert_eq!(Some(claims.psk), ok.psk);
    // Ping is accepted with it.
    let pong = a.request(a.ping_flow()).await;
    assert!(
        matches!(to_actr(&pong), signaling_to_actr::Payload::Pong(p) if p.suggest_interval_secs == Some(30) && p.credential_warning.is_none())
    );
}

#[tokio::test]
async fn register_refusals() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let mut a = Client::connect(&srv.url("")).await;
    // Unknown realm: 403 with the placeholder target.
    let reply = a
        .register_full(999, actr_type("echo"), None, None, None)
        .await;
    let Some(register_response::Result::Error(e)) = register_result(&reply) else {
        panic!("{reply:?}")
    };
    assert_eq!(e.code, 403);
    assert!(e.message.starts_with("Realm validation failed"));
    match &reply.flow {
        Some(signaling_envelope::Flow::ServerToActr(s)) => {
            assert_eq!(s.target.r#type.manufacturer, "temp");
            assert_eq!(s.target.serial_number, 0);
        }
        _ => unreachable!(),
    }
    // Bad name.
    let mut t = actr_type("echo");
    t.name = "1bad".into();
    let reply = a.register_full(REALM, t, None, None, None).await;
    assert!(
        matches!(register_result(&reply), Some(register_response::Result::Error(e)) if e.code == 400)
    );
    // Duplicate: 409.
    a.register("echo", &[]).await;
    let reply = a
        .register_full(REALM, actr_type("echo"), None, None, None)
        .await;
    assert!(
        matches!(register_result(&reply), Some(register_response::Result::Error(e)) if e.code == 409 && e.message == "Already registered")
    );
}

#[tokio::test]
async fn discovery_and_route_candidates_follow_the_acl() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let mut client = Client::connect(&srv.url("")).await;
    client.register("client", &[]).await;
    // Two echo servers that allow `client`, one `secret` service that does not.
    let spec = ServiceSpec {
        name: "echo-svc".into(),
        description: Some("echo".into()),
        fingerprint: "fp-1".into(),
        protobufs: vec![service_spec::Protobuf {
            package: "echo.v1".into(),
            content: "message A {}".into(),
            fingerprint: "p1".into(),
        }],
        published_at: Some(5),
        tags: vec!["latest".into()],
    };
    let mut e1 = Client::connect(&srv.url("")).await;
    e1.register_full(
        REALM,
        actr_type("echo"),
        Some(allow(&["client"])),
        Some(spec.clone()),
        Some("ws://10.0.0.1:9100".into()),
    )
    .await;
    let mut e2 = Client::connect(&srv.url("")).await;
    e2.register_full(
        REALM,
        actr_type("echo"),
        Some(allow(&["client"])),
        Some(spec.clone()),
        None,
    )
    .await;
    let mut s = Client::connect(&srv.url("")).await;
    s.register("secret", &[]).await;
    // Another realm's echo is invisible.
    let mut other = Client::connect(&srv.url("")).await;
    other
        .register_full(
            OTHER_REALM,
            actr_type("echo"),
            Some(allow(&["client"])),
            None,
            None,
        )
        .await;

    let reply = client
        .request(client.actr(actr_to_signaling::Payload::DiscoveryRequest(
            DiscoveryRequest {
                manufacturer: None,
                limit: None,
            },
        )))
        .await;
    let signaling_to_actr::Payload::DiscoveryResponse(DiscoveryResponse {
        result: Some(discovery_response::Result::Success(ok)),
    }) = to_actr(&reply)
    else {
        panic!("{reply:?}")
    };
    assert_eq!(ok.entries.len(), 1, "{ok:?}");
    assert_eq!(ok.entries[0].name, "echo-svc");
    assert_eq!(ok.entries[0].service_fingerprint, "fp-1");
    assert_eq!(ok.entries[0].tags, vec!["latest".to_owned()]);

    // Plain route candidates: both echo instances, ws_address_map for both.
    let me = client.id.clone().unwrap();
    let mecred = client.cred.clone().unwrap();
    let rc = |fp: &str| {
        signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: me.clone(),
            credential: mecred.clone(),
            payload: Some(actr_to_signaling::Payload::RouteCandidatesRequest(
                RouteCandidatesRequest {
                    target_type: ActrType {
                        manufacturer: "acme".into(),
                        name: "echo".into(),
                        version: None,
                    },
                    criteria: None,
                    client_location: None,
                    client_fingerprint: fp.into(),
                },
            )),
        })
    };
    let reply = client.request(rc("")).await;
    let signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse {
        result: Some(route_candidates_response::Result::Success(ok)),
    }) = to_actr(&reply)
    else {
        panic!("{reply:?}")
    };
    let mut got: Vec<u64> = ok.candidates.iter().map(|c| c.serial_number).collect();
    got.sort();
    let mut want = vec![
        e1.id.as_ref().unwrap().serial_number,
        e2.id.as_ref().unwrap().serial_number,
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(ok.ws_address_map.len(), 2);
    assert!(ok
        .ws_address_map
        .iter()
        .any(|w| w.ws_address.as_deref() == Some("ws://10.0.0.1:9100")));

    // Negotiation mode with the exact fingerprint.
    let reply = client.request(rc("fp-1")).await;
    let signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse {
        result: Some(route_candidates_response::Result::Success(ok)),
    }) = to_actr(&reply)
    else {
        panic!()
    };
    assert_eq!(ok.has_exact_match, Some(true));
    assert_eq!(ok.candidates.len(), 2);
    assert!(ok
        .compatibility_info
        .iter()
        .all(|i| i.is_exact_match == Some(true)));

    // The secret service denies `client`: no candidates.
    let reply = client
        .request(
            client.actr(actr_to_signaling::Payload::RouteCandidatesRequest(
                RouteCandidatesRequest {
                    target_type: actr_type("secret"),
                    criteria: None,
                    client_location: None,
                    client_fingerprint: String::new(),
                },
            )),
        )
        .await;
    let signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse {
        result: Some(route_candidates_response::Result::Success(ok)),
    }) = to_actr(&reply)
    else {
        panic!()
    };
    assert!(ok.candidates.is_empty() && ok.ws_address_map.is_empty());

    // Service spec lookup (404 for an unknown name).
    let reply = client
        .request(
            client.actr(actr_to_signaling::Payload::GetServiceSpecRequest(
                GetServiceSpecRequest {
                    name: "echo-svc".into(),
                },
            )),
        )
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::GetServiceSpecResponse(GetServiceSpecResponse { result: Some(get_service_spec_response::Result::Success(s)) }) if *s == spec)
    );
    let reply = client
        .request(
            client.actr(actr_to_signaling::Payload::GetServiceSpecRequest(
                GetServiceSpecRequest {
                    name: "nope".into(),
                },
            )),
        )
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::GetServiceSpecResponse(GetServiceSpecResponse { result: Some(get_service_spec_response::Result::Error(e)) }) if e.code == 404)
    );
}

#[tokio::test]
async fn presence_events_respect_the_acl() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let mut watcher = Client::connect(&srv.url("")).await;
    watcher.register("watcher", &[]).await;
    let reply = watcher
        .request(
            watcher.actr(actr_to_signaling::Payload::SubscribeActrUpRequest(
                SubscribeActrUpRequest {
                    target_type: actr_type("echo"),
                },
            )),
        )
        .await;
    assert!(matches!(
        to_actr(&reply),
        signaling_to_actr::Payload::SubscribeActrUpResponse(SubscribeActrUpResponse {
            result: Some(subscribe_actr_up_response::Result::Success(_))
        })
    ));
    let reply = watcher
        .request(
            watcher.actr(actr_to_signaling::Payload::SubscribeActrUpRequest(
                SubscribeActrUpRequest {
                    target_type: actr_type("hidden"),
                },
            )),
        )
        .await;
    assert!(matches!(
        to_actr(&reply),
        signaling_to_actr::Payload::SubscribeActrUpResponse(_)
    ));
    // `hidden` does not allow the watcher: no event.
    let mut h = Client::connect(&srv.url("")).await;
    h.register("hidden", &[]).await;
    watcher.expect_silence(Duration::from_millis(300)).await;
    // `echo` allows it: one event, no reply_for.
    let mut e = Client::connect(&srv.url("")).await;
    let eid = e.register("echo", &["watcher"]).await;
    let ev = watcher.recv().await;
    assert!(ev.reply_for.is_none());
    assert!(
        matches!(to_actr(&ev), signaling_to_actr::Payload::ActrUpEvent(ActrUpEvent { actor_id }) if *actor_id == eid)
    );
    // Unsubscribe: no more events.
    watcher
        .request(
            watcher.actr(actr_to_signaling::Payload::UnsubscribeActrUpRequest(
                UnsubscribeActrUpRequest {
                    target_type: actr_type("echo"),
                },
            )),
        )
        .await;
    let mut e2 = Client::connect(&srv.url("")).await;
    e2.register("echo", &["watcher"]).await;
    watcher.expect_silence(Duration::from_millis(300)).await;
}

async fn pair(srv: &Server) -> (Client, Client) {
    let mut a = Client::connect(&srv.url("")).await;
    a.register("alice", &["bob"]).await;
    let mut b = Client::connect(&srv.url("webrtc_role=answer")).await;
    b.register("bob", &["alice"]).await;
    (a, b)
}

#[tokio::test]
async fn relay_sdp_ice_and_role_assignment() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let bid = b.id.clone().unwrap();
    let aid = a.id.clone().unwrap();
    a.send(a.relay(&bid, sdp("v=0 offer"))).await;
    let got = b.recv().await;
    assert!(got.reply_for.is_none());
    let r = relay_of(&got);
    assert_eq!(r.source, aid);
    assert_eq!(r.target, bid);
    assert!(
        r.credential.encrypted_token.is_empty() && r.credential.token_key_id == 0,
        "credential stripped"
    );
    assert!(
        matches!(&r.payload, Some(actr_relay::Payload::SessionDescription(s)) if s.sdp == "v=0 offer")
    );
    b.send(b.relay(
        &aid,
        actr_relay::Payload::IceCandidate(IceCandidate {
            candidate: "candidate:1 1 udp 1 10.0.0.1 5000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        }),
    ))
    .await;
    let got = a.recv().await;
    assert!(
        matches!(&relay_of(&got).payload, Some(actr_relay::Payload::IceCandidate(c)) if c.sdp_mid.as_deref() == Some("0"))
    );
    b.send(b.relay(
        &aid,
        actr_relay::Payload::IceRestartRequest(IceRestartRequest {
            reason: Some("network_recovered".into()),
        }),
    ))
    .await;
    assert!(matches!(
        &relay_of(&a.recv().await).payload,
        Some(actr_relay::Payload::IceRestartRequest(_))
    ));

    // Role negotiation: bob wants to answer, so alice offers.
    a.send(a.relay(
        &bid,
        actr_relay::Payload::RoleNegotiation(RoleNegotiation {
            from: aid.clone(),
            to: bid.clone(),
            realm_id: REALM,
        }),
    ))
    .await;
    for (c, offerer, fixed) in [(&mut a, true, true), (&mut b, false, false)] {
        let got = c.recv().await;
        let r = relay_of(&got);
        assert_eq!((&r.source, &r.target), (&aid, &bid));
        assert!(r.credential.encrypted_token.is_empty());
        assert!(
            matches!(&r.payload, Some(actr_relay::Payload::RoleAssignment(ra)) if ra.is_offerer == offerer && ra.remote_fixed == Some(fixed)),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn relay_refusals() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let bid = b.id.clone().unwrap();
    // ACL denied: carol is not allowed by bob.
    let mut c = Client::connect(&srv.url("")).await;
    c.register("carol", &[]).await;
    let reply = c.request(c.relay(&bid, sdp("x"))).await;
    assert_eq!(
        error_code(&reply).unwrap(),
        (403, "ACL policy denies relay to target actor".into())
    );
    // Cross-realm.
    let mut x = Client::connect(&srv.url("")).await;
    x.register_full(
        OTHER_REALM,
        actr_type("alice"),
        Some(allow(&["bob"])),
        None,
        None,
    )
    .await;
    let reply = x.request(x.relay(&bid, sdp("x"))).await;
    assert_eq!(
        error_code(&reply).unwrap(),
        (403, "Cross-realm relay is not allowed".into())
    );
    // Spoofed source: carol claims to be alice with her own credential.
    let mut spoof = match c.relay(&bid, sdp("x")) {
        signaling_envelope::Flow::ActrRelay(r) => r,
        _ => unreachable!(),
    };
    spoof.source = a.id.clone().unwrap();
    let reply = c
        .request(signaling_envelope::Flow::ActrRelay(spoof.clone()))
        .await;
    assert_eq!(error_code(&reply).unwrap().0, 403);
    // Spoofed source with alice's real credential, sent from carol's connection.
    spoof.credential = a.cred.clone().unwrap();
    let reply = c.request(signaling_envelope::Flow::ActrRelay(spoof)).await;
    assert_eq!(
        error_code(&reply).unwrap(),
        (
            403,
            "Source identity mismatch: connection is not bound to source".into()
        )
    );
    // Tampered credential.
    let mut tampered = a.cred.clone().unwrap();
    let n = tampered.encrypted_token.len();
    tampered.encrypted_token[n - 1] ^= 1;
    let mut r = match a.relay(&bid, sdp("x")) {
        signaling_envelope::Flow::ActrRelay(r) => r,
        _ => unreachable!(),
    };
    r.credential = tampered.clone();
    let reply = a.request(signaling_envelope::Flow::ActrRelay(r)).await;
    assert_eq!(error_code(&reply).unwrap().0, 401);
    // Tampered credential on a ping: 401 (clients re-register on it).
    let ping = match a.ping_flow() {
        signaling_envelope::Flow::ActrToServer(mut p) => {
            p.credential = tampered;
            signaling_envelope::Flow::ActrToServer(p)
        }
        _ => unreachable!(),
    };
    let reply = a.request(ping).await;
    assert_eq!(error_code(&reply).unwrap().0, 401);
    // Nothing reached bob.
    b.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn expired_credential_is_refused() {
    let dir = tmp();
    let mut cfg = control_config(dir.path());
    cfg.ais.token_ttl_secs = 1;
    let srv = start_with(cfg, dir.path(), test_config());
    let mut a = Client::connect(&srv.url("")).await;
    a.register("alice", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = a.request(a.ping_flow()).await;
    let (code, msg) = error_code(&reply).unwrap();
    assert_eq!(code, 401);
    assert!(msg.contains("expired"), "{msg}");
}

#[tokio::test]
async fn credential_update_keeps_the_actr_id() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let aid = a.id.clone().unwrap();
    let reply = a
        .request(a.actr(actr_to_signaling::Payload::CredentialUpdateRequest(
            CredentialUpdateRequest {
                actr_id: aid.clone(),
            },
        )))
        .await;
    let Some(register_response::Result::Success(ok)) = register_result(&reply) else {
        panic!("{reply:?}")
    };
    assert_eq!(ok.actr_id, aid);
    assert_ne!(
        ok.credential.encrypted_token,
        a.cred.as_ref().unwrap().encrypted_token
    );
    // The new credential names the same actor and works for relay.
    a.cred = Some(ok.credential.clone());
    let bid = b.id.clone().unwrap();
    a.send(a.relay(&bid, sdp("after refresh"))).await;
    assert!(
        matches!(&relay_of(&b.recv().await).payload, Some(actr_relay::Payload::SessionDescription(s)) if s.sdp == "after refresh")
    );
    // An update for another ActrId is ignored silently.
    let mut other = aid.clone();
    other.serial_number += 1;
    a.send(a.actr(actr_to_signaling::Payload::CredentialUpdateRequest(
        CredentialUpdateRequest { actr_id: other },
    )))
    .await;
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unregister_removes_the_actor() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let reply = b
        .request(b.actr(actr_to_signaling::Payload::UnregisterRequest(
            UnregisterRequest {
                actr_id: b.id.clone().unwrap(),
                reason: Some("bye".into()),
            },
        )))
        .await;
    assert!(matches!(
        to_actr(&reply),
        signaling_to_actr::Payload::UnregisterResponse(UnregisterResponse {
            result: Some(unregister_response::Result::Success(_))
        })
    ));
    let reply = a
        .request(a.actr(actr_to_signaling::Payload::RouteCandidatesRequest(
            RouteCandidatesRequest {
                target_type: actr_type("bob"),
                criteria: None,
                client_location: None,
                client_fingerprint: String::new(),
            },
        )))
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse { result: Some(route_candidates_response::Result::Success(ok)) }) if ok.candidates.is_empty())
    );
}

#[tokio::test]
async fn malformed_frames_close_but_do_not_hurt_others() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let mut bad = Client::connect(&srv.url("")).await;
    // Empty frame: an envelope with no flow, ignored.
    bad.send_raw(vec![]).await;
    bad.expect_silence(Duration::from_millis(200)).await;
    // Truncated varint: envelope_error 400, then close.
    bad.send_raw(vec![0x08, 0xff]).await;
    let e = bad.recv().await;
    assert_eq!(error_code(&e).unwrap().0, 400);
    assert_eq!(
        bad.expect_closed(Duration::from_secs(3)).await,
        Some(1007),
        "closed with 1007 (invalid frame payload data)"
    );
    // Text frames are ignored.
    let mut t = Client::connect(&srv.url("")).await;
    use futures_util::SinkExt;
    t.ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello".into(),
    ))
    .await
    .unwrap();
    t.expect_silence(Duration::from_millis(200)).await;
    // The hub still routes.
    let bid = b.id.clone().unwrap();
    a.send(a.relay(&bid, sdp("still up"))).await;
    assert!(matches!(
        &relay_of(&b.recv().await).payload,
        Some(actr_relay::Payload::SessionDescription(_))
    ));
    assert!(
        srv.stats
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            max_message_bytes: 4096,
            max_frame_bytes: 4096,
            ..test_config()
        },
    );
    for fragmented in [false, true] {
        let (mut ws, _) = tokio_tungstenite::connect_async(srv.url("")).await.unwrap();
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        use tokio_tungstenite::tungstenite::Message;
        if fragmented {
            // Many small frames adding up to more than the limit.
            let chunk = vec![0u8; 1024];
            ws.send(Message::Frame(Frame::message(
                chunk.clone(),
                OpCode::Data(Data::Binary),
                false,
            )))
            .await
            .unwrap();
            for _ in 0..5 {
                let _ = ws
                    .send(Message::Frame(Frame::message(
                        chunk.clone(),
                        OpCode::Data(Data::Continue),
                        false,
                    )))
                    .await;
            }
        } else {
            ws.send(Message::Binary(vec![0u8; 4097].into()))
                .await
                .unwrap();
        }
        let mut code = None;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            match m {
                Ok(Message::Close(Some(f))) => {
                    code = Some(u16::from(f.code));
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        assert_eq!(code, Some(1009), "fragmented={fragmented}");
    }
}

#[tokio::test]
async fn message_rate_limit_gives_429() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            msg_rate_per_sec: 1,
            msg_burst: 5,
            ..test_config()
        },
    );
    let mut a = Client::connect(&srv.url("")).await;
    a.register("alice", &[]).await; // 1 message
    for _ in 0..10 {
        a.send(a.ping_flow()).await;
    }
    let mut limited = 0;
    let mut pongs = 0;
    while let Event::Frame(e) = a.recv_event(Duration::from_millis(500)).await {
        match error_code(&e) {
            Some((429, m)) => {
                assert_eq!(m, "Too many messages. Limit: 1 messages/second");
                assert!(e.reply_for.is_none());
                limited += 1
            }
            _ => pongs += 1,
        }
    }
    assert_eq!(pongs, 4);
    assert_eq!(limited, 6);
}

/// The HTTP status of the WebSocket upgrade of `req` (None when no response came). An
/// accepted connection is leaked when `keep_open`, so it keeps its admission slot for the rest
/// of the test, and closed otherwise.
async fn upgrade_status<R>(req: R, keep_open: bool) -> Option<u16>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            if keep_open {
                std::mem::forget(ws);
            } else {
                drop(ws);
            }
            Some(resp.status().as_u16())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Some(r.status().as_u16()),
        Err(_) => None,
    }
}

/// Upgrade status of a plain (non-browser) request; an accepted connection stays open.
async fn http_status(url: &str) -> Option<u16> {
    upgrade_status(url, true).await
}

#[tokio::test]
async fn connection_rate_and_concurrency_give_http_429() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            conn_rate_per_sec: 1,
            conn_burst: 3,
            ..test_config()
        },
    );
    let mut ok = Vec::new();
    for _ in 0..3 {
        ok.push(Client::connect(&srv.url("")).await);
    }
    assert_eq!(http_status(&srv.url("")).await, Some(429));
    drop(ok);

    let dir2 = tmp();
    let srv2 = start(
        dir2.path(),
        actrix_signaling::SignalingConfig {
            max_conns_per_ip: 2,
            ..test_config()
        },
    );
    let a = Client::connect(&srv2.url("")).await;
    let b = Client::connect(&srv2.url("")).await;
    assert_eq!(http_status(&srv2.url("")).await, Some(429));
    drop(a);
    // The slot is released when the connection ends.
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(srv2.url("")).await {
            drop(ws);
            freed = true;
            break;
        }
    }
    assert!(freed);
    drop(b);
}

#[tokio::test]
async fn reconnect_identity_is_validated() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    let (mut a, mut b) = pair(&srv).await;
    let aid = a.id.clone().unwrap();
    let bid = b.id.clone().unwrap();
    // Forged: bob's valid token presented as alice's identity.
    let forged = form_query(&[
        ("actor_id", actr_id_string(&aid)),
        ("token", {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .encode(&b.cred.as_ref().unwrap().encrypted_token)
        }),
        (
            "token_key_id",
            b.cred.as_ref().unwrap().token_key_id.to_string(),
        ),
    ]);
    let mut evil = Client::connect(&srv.url(&forged)).await;
    evil.id = Some(aid.clone());
    evil.cred = a.cred.clone();
    // Not bound: cannot act as alice even with her credential, and alice was not evicted.
    let reply = evil.request(evil.ping_flow()).await;
    assert_eq!(error_code(&reply).unwrap().0, 403);
    b.send(b.relay(&aid, sdp("to alice"))).await;
    assert!(
        matches!(&relay_of(&a.recv().await).payload, Some(actr_relay::Payload::SessionDescription(s)) if s.sdp == "to alice")
    );
    // Garbage token: also refused.
    let garbage = form_query(&[("actor_id", actr_id_string(&aid)), ("token", "AAAA".into())]);
    let _g = Client::connect(&srv.url(&garbage)).await;
    assert!(
        srv.stats
            .url_identity_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    // Valid: alice reconnects, the old connection is closed, relays reach the new one.
    let mut a2 = Client::connect(&srv.url(&a.reconnect_query())).await;
    a2.id = a.id.clone();
    a2.cred = a.cred.clone();
    assert_eq!(
        a.expect_closed(Duration::from_secs(3)).await,
        Some(4000),
        "old connection closed: replaced by a newer connection"
    );
    let pong = a2.request(a2.ping_flow()).await;
    assert!(matches!(
        to_actr(&pong),
        signaling_to_actr::Payload::Pong(_)
    ));
    // Already registered via the URL: 409.
    let reply = a2
        .register_full(REALM, actr_type("alice"), None, None, None)
        .await;
    assert!(
        matches!(register_result(&reply), Some(register_response::Result::Error(e)) if e.code == 409)
    );
    b.send(b.relay(&aid, sdp("to alice 2"))).await;
    assert!(
        matches!(&relay_of(&a2.recv().await).payload, Some(actr_relay::Payload::SessionDescription(s)) if s.sdp == "to alice 2")
    );
    let _ = bid;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_survives_a_restart_and_ping_restores() {
    let dir = tmp();
    let mut srv = start(dir.path(), test_config());
    let (a, b) = pair(&srv).await;
    let (aid, bid) = (a.id.clone().unwrap(), b.id.clone().unwrap());
    let (aq, bq) = (a.reconnect_query(), b.reconnect_query());
    let (acred, bcred) = (a.cred.clone(), b.cred.clone());
    // Give the writer thread a moment, then stop the server with the clients still connected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| srv.stop());
    drop((a, b));

    let srv = start(dir.path(), test_config());
    let mut a = Client::connect(&srv.url(&aq)).await;
    a.id = Some(aid.clone());
    a.cred = acred;
    let mut b = Client::connect(&srv.url(&bq)).await;
    b.id = Some(bid.clone());
    b.cred = bcred;
    // Before any Ping, bob is not in memory.
    let rc = RouteCandidatesRequest {
        target_type: actr_type("bob"),
        criteria: None,
        client_location: None,
        client_fingerprint: String::new(),
    };
    let reply = a
        .request(a.actr(actr_to_signaling::Payload::RouteCandidatesRequest(
            rc.clone(),
        )))
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse { result: Some(route_candidates_response::Result::Success(ok)) }) if ok.candidates.is_empty())
    );
    // Bob pings: restored from the database (ACL too, it is persisted).
    let pong = b.request(b.ping_flow()).await;
    assert!(matches!(
        to_actr(&pong),
        signaling_to_actr::Payload::Pong(_)
    ));
    let reply = a
        .request(a.actr(actr_to_signaling::Payload::RouteCandidatesRequest(rc)))
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse { result: Some(route_candidates_response::Result::Success(ok)) }) if ok.candidates == vec![bid.clone()]),
        "{reply:?}"
    );
    assert_eq!(
        srv.stats
            .registry_restores
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn heartbeat_timeout_evicts_and_ping_restores() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            heartbeat_timeout_secs: 1,
            sweep_interval_secs: 1,
            ..test_config()
        },
    );
    let (mut a, mut b) = pair(&srv).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(
        srv.stats
            .registry_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    let pong = b.request(b.ping_flow()).await;
    assert!(matches!(
        to_actr(&pong),
        signaling_to_actr::Payload::Pong(_)
    ));
    let reply = a
        .request(a.actr(actr_to_signaling::Payload::RouteCandidatesRequest(
            RouteCandidatesRequest {
                target_type: actr_type("bob"),
                criteria: None,
                client_location: None,
                client_fingerprint: String::new(),
            },
        )))
        .await;
    assert!(
        matches!(to_actr(&reply), signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse { result: Some(route_candidates_response::Result::Success(ok)) }) if ok.candidates.len() == 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_while_others_stay_fast() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            send_queue_len: 16,
            ..test_config()
        },
    );
    // The slow pair: `sink` never reads.
    let (mut a, sink) = pair(&srv).await;
    let sink_id = sink.id.clone().unwrap();
    // The healthy pair.
    let mut c = Client::connect(&srv.url("")).await;
    c.register("carol", &["dave"]).await;
    let mut d = Client::connect(&srv.url("")).await;
    d.register("dave", &["carol"]).await;
    let did = d.id.clone().unwrap();
    let big = "x".repeat(60_000);
    for _ in 0..400 {
        a.send(a.relay(&sink_id, sdp(&big))).await;
        if srv
            .stats
            .slow_consumer_drops
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
    }
    assert!(
        srv.stats
            .slow_consumer_drops
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let mut worst = Duration::ZERO;
    for i in 0..50 {
        let t0 = std::time::Instant::now();
        c.send(c.relay(&did, sdp(&format!("m{i}")))).await;
        let _ = d.recv().await;
        worst = worst.max(t0.elapsed());
    }
    assert!(
        worst < Duration::from_millis(200),
        "healthy pair latency {worst:?}"
    );
    drop(sink);
}

#[tokio::test]
async fn auth_timeout_closes_unbound_connections() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            auth_timeout_secs: 1,
            ..test_config()
        },
    );
    let mut c = Client::connect(&srv.url("")).await;
    let t0 = std::time::Instant::now();
    assert_eq!(
        c.expect_closed(Duration::from_secs(4)).await,
        Some(1008),
        "closed with 1008 (policy) at the auth deadline"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "not before the deadline"
    );
    // A connection that binds in time is not closed.
    let mut d = Client::connect(&srv.url("")).await;
    d.register("dora", &[]).await;
    d.expect_silence(Duration::from_millis(1500)).await;
}

#[test]
fn relayed_envelope_wire_bytes_match_the_schema() {
    // A relay as the hub emits it, re-decoded: required fields present, credential empty.
    let env = envelope(
        "x".into(),
        signaling_envelope::Flow::ActrRelay(ActrRelay {
            source: ActrId::default(),
            credential: AIdCredential::default(),
            target: ActrId::default(),
            payload: None,
        }),
    );
    let bytes = env.encode_to_vec();
    let back = SignalingEnvelope::decode(&bytes[..]).unwrap();
    assert_eq!(back, env);
}

/// Upgrade status of a browser-like request carrying `origin`.
async fn status_with_origin(url: &str, origin: &str) -> Option<u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("origin", origin.parse().unwrap());
    upgrade_status(req, false).await
}

#[tokio::test]
async fn cross_origin_browser_upgrades_are_refused() {
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            allowed_origins: vec!["https://app.example.com".into()],
            ..test_config()
        },
    );
    let url = srv.url("");
    // A page of another origin: 403 before the upgrade, counted.
    assert_eq!(
        status_with_origin(&url, "https://evil.example").await,
        Some(403)
    );
    assert_eq!(
        status_with_origin(&url, "http://app.example.com").await,
        Some(403),
        "the scheme is part of the origin"
    );
    assert_eq!(
        srv.stats
            .connections_rejected_origin
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The listed origin, the node's own origin, and native clients (no Origin) get in.
    assert_eq!(
        status_with_origin(&url, "https://APP.example.com").await,
        Some(101)
    );
    assert_eq!(
        status_with_origin(&url, &format!("http://{}", srv.addr)).await,
        Some(101)
    );
    assert_eq!(http_status(&url).await, Some(101));
}

#[tokio::test]
async fn protocol_errors_and_a_client_close_get_a_close_frame_with_the_right_code() {
    let dir = tmp();
    let srv = start(dir.path(), test_config());
    // RFC 6455 §5.2: a reserved bit set without an extension that defines it, an unmasked
    // client frame, a reserved opcode: 1002 (protocol error), sent before the connection is
    // dropped.
    for (first, masked, what) in [
        (0x80 | 0x40 | 0x2, true, "RSV1 set"),
        (0x80 | 0x2, false, "unmasked client frame"),
        (0x80 | 0x3, true, "reserved opcode 3"),
    ] {
        let mut raw = RawWs::connect(&srv).await;
        raw.send_frame(first, masked, b"\x08\x01").await;
        let (frames, closed) = raw.frames_until_closed(Duration::from_secs(4)).await;
        assert_eq!(close_code(&frames), Some(1002), "{what}: {frames:?}");
        assert!(closed, "{what}: dropped after the close frame");
    }
    // A client that closes with 1000 gets its close echoed (RFC 6455 §5.5.1).
    for code in [1000u16, 3001] {
        let mut raw = RawWs::connect(&srv).await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        raw.send_frame(0x80 | 0x8, true, &payload).await;
        let (frames, closed) = raw.frames_until_closed(Duration::from_secs(4)).await;
        assert_eq!(close_code(&frames), Some(code), "{frames:?}");
        assert!(closed);
    }
    // The same through a real client library.
    let mut c = Client::connect(&srv.url("")).await;
    c.ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    assert_eq!(c.expect_closed(Duration::from_secs(3)).await, Some(1000));
    assert!(
        srv.stats
            .protocol_closes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

#[tokio::test]
async fn server_pings_keep_a_quiet_peer_and_the_pong_deadline_drops_a_dead_one() {
    // Reliability checklist W7: a client that is quiet longer than a proxy's idle timeout is
    // kept alive by the server's pings (its pongs count as activity); a peer that does not
    // answer (here: never reads, so never pongs) is closed once the deadline passes.
    let dir = tmp();
    let srv = start(
        dir.path(),
        actrix_signaling::SignalingConfig {
            ping_interval_secs: 1,
            idle_timeout_secs: 3,
            ..test_config()
        },
    );
    let mut dead = RawWs::connect(&srv).await;
    let mut alive = Client::connect(&srv.url("")).await;
    alive.register("quiet", &[]).await;
    // Read (and so answer pings) for twice the idle timeout, sending nothing.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    use futures_util::StreamExt;
    while let Ok(m) = tokio::time::timeout_at(until, alive.ws.next()).await {
        match m {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                panic!("a peer that answers pings was closed: {f:?}")
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
    assert!(pings >= 4, "pings every second: {pings}");
    let pong = alive.request(alive.ping_flow()).await;
    assert!(matches!(
        to_actr(&pong),
        signaling_to_actr::Payload::Pong(_)
    ));
    // The dead peer got pings it never answered, then a close (1001, going away) at the
    // deadline, and the connection was dropped.
    let (frames, closed) = dead.frames_until_closed(Duration::from_secs(2)).await;
    assert!(
        frames.iter().filter(|(op, _)| *op == 0x9).count() >= 2,
        "{frames:?}"
    );
    assert_eq!(close_code(&frames), Some(1001), "{frames:?}");
    assert!(closed);
    assert!(
        srv.stats
            .timeout_closes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn every_data_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let mut srv = start(dir.path(), test_config());
    let mut a = Client::connect(&srv.url("")).await;
    a.register("alice", &[]).await;
    drop(a);
    srv.stop();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{name} is not owner-only"
        );
        seen.push(name);
    }
    for db in ["signaling.db", "control.db", "ks.db"] {
        assert!(seen.iter().any(|n| n == db), "{db} missing: {seen:?}");
    }
    // An existing database with a wider mode (made by an older version) is tightened.
    let sig = dir.path().join("signaling.db");
    std::fs::set_permissions(&sig, std::fs::Permissions::from_mode(0o644)).unwrap();
    let srv = start(dir.path(), test_config());
    assert_eq!(
        std::fs::metadata(&sig).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(srv);
}
