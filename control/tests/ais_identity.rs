//! AIS over HTTP (wire reference section 5) and TURN identity verification (section 6),
//! including the Appendix A.4 chain.

mod common;

use std::collections::HashSet;

use actrix_control::ais::proto::{
    acl_rule, actr_id_string, register_response, service_spec, Acl, AclRule, ActrType,
    Realm as PbRealm, RegisterRequest, RegisterResponse, ServiceSpec,
};
use actrix_control::ais::snowflake::Snowflake;
use actrix_control::ais::{self, IdentityClaims};
use actrix_control::crypto;
use actrix_control::identity::{IdentityError, IdentityVerifier};
use actrix_control::testing::IdentityProbe;
use actrix_control::{
    ControlBuilder, ControlConfig, ControlHandle, KeySource, KsClient, Realm, RealmStatus,
    RealmStore, SystemClock,
};
use axum::routing::get as axum_get;
use base64::Engine as _;
use common::*;
use prost::Message as _;

fn request(realm: u32) -> RegisterRequest {
    RegisterRequest {
        actr_type: ActrType {
            manufacturer: "acme".into(),
            name: "echo".into(),
            version: Some("1.0.0".into()),
        },
        realm: PbRealm { realm_id: realm },
        service_spec: None,
        acl: None,
        service: None,
        ws_address: None,
    }
}

fn post_register(
    base: &str,
    body: &[u8],
    headers: &[(&'static str, String)],
) -> (u16, String, RegisterResponse) {
    let mut req = agent()
        .post(format!("{base}/ais/register"))
        .header("content-type", "application/octet-stream");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = resp.body_mut().read_to_vec().unwrap();
    (status, ct, RegisterResponse::decode(&bytes[..]).unwrap())
}

fn register_ok(base: &str, realm: u32) -> register_response::RegisterOk {
    let (st, ct, resp) = post_register(base, &request(realm).encode_to_vec(), &[]);
    assert_eq!(st, 200);
    assert_eq!(ct, "application/octet-stream");
    match resp.result {
        Some(register_response::Result::Success(ok)) => ok,
        other => panic!("register failed: {other:?}"),
    }
}

fn username(realm: u32, key_id: u32, token: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&realm.to_be_bytes());
    raw.extend_from_slice(&key_id.to_be_bytes());
    raw.extend_from_slice(token);
    crypto::base122_encode(&raw)
}

fn provision(realms: &RealmStore, id: u32, status: RealmStatus, expires_at: Option<u64>) {
    realms
        .upsert(&Realm {
            realm_id: id,
            name: format!("realm-{id}"),
            status,
            expires_at,
        })
        .unwrap();
}

/// A control plane that serves identity lookups, and the probe that asks them.
fn start_with_identity(cfg: ControlConfig) -> (ControlHandle, IdentityProbe) {
    let (b, probe) = IdentityProbe::attach(ControlBuilder::new(cfg));
    (b.spawn().expect("control plane starts"), probe)
}

#[test]
fn register_issues_a_decryptable_credential() {
    let dir = tempfile::tempdir().unwrap();
    let (h, probe) = start_with_identity(config(dir.path()));
    let base = base(&h);
    let before = now();
    let ok = register_ok(&base, 101);
    let ok2 = register_ok(&base, 101);
    assert_ne!(ok.actr_id.serial_number, ok2.actr_id.serial_number);
    assert!(ok.actr_id.serial_number < 1 << 54);
    assert_eq!(ok.actr_id.realm.realm_id, 101);
    assert_eq!(ok.actr_id.r#type, request(101).actr_type);
    assert_eq!(ok.signaling_heartbeat_interval_secs, 30);
    let psk = ok.psk.clone().unwrap();
    assert_eq!(psk.len(), 32);
    assert_ne!(Some(psk.clone()), ok2.psk);

    // Decrypt with the KS secret key, fetched like a verifier would.
    let client = KsClient::new(&base, SHARED_KEY);
    let sec = client.get_secret_key(ok.credential.token_key_id).unwrap();
    let plain = crypto::ecies_decrypt(&sec.secret_key[..], &ok.credential.encrypted_token).unwrap();
    let text = std::str::from_utf8(&plain).unwrap();
    let actor_id = actr_id_string(&ok.actr_id);
    let expected_prefix = format!("{{\"realm_id\":101,\"actor_id\":\"{actor_id}\",\"expr_time\":");
    assert!(text.starts_with(&expected_prefix), "{text}");
    assert!(
        text.contains(",\"psk\":[") && text.ends_with("]}"),
        "{text}"
    );
    let claims: IdentityClaims = serde_json::from_slice(&plain).unwrap();
    assert_eq!(claims.psk, psk);
    assert!(claims.expr_time >= before + 3600 && claims.expr_time <= now() + 3600);
    assert_eq!(
        ok.credential_expires_at.as_ref().unwrap().seconds as u64,
        claims.expr_time
    );
    assert_eq!(ok.credential_expires_at.as_ref().unwrap().nanos, 0);
    assert!(actor_id.ends_with("@101/acme:echo:1.0.0"), "{actor_id}");

    // The same credential is accepted by the TURN identity path on the control thread.
    provision(h.realms(), 101, RealmStatus::Normal, None);
    let user = username(
        101,
        ok.credential.token_key_id,
        &ok.credential.encrypted_token,
    );
    let id = probe.ask(&user).unwrap();
    assert_eq!(id.expires_at, claims.expr_time);
    assert_eq!(
        id.key_md5,
        crypto::turn_key(&user, "actor-rtc.local", &psk),
        "MD5(username:realm:hex(psk))"
    );
    // And refused when tampered.
    let mut token = ok.credential.encrypted_token.clone();
    token[100] ^= 0x40;
    let bad = username(101, ok.credential.token_key_id, &token);
    assert_eq!(probe.ask(&bad), Err(IdentityError::InvalidToken.refusal()));
    assert_eq!(
        probe.ask(b"\xff\xfe"),
        Err(IdentityError::MalformedUsername.refusal())
    );

    let (st, health) = get(&base, "/ais/health");
    assert_eq!(st, 200);
    assert_eq!(health["service"], "ais");
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["database"], "ok");
    assert_eq!(health["ks_service"], "ok");
    assert_eq!(health["key_cache"]["status"], "ok");
    assert_eq!(health["key_cache"]["key_id"], ok.credential.token_key_id);
}

#[test]
fn verifier_refuses_bad_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let base = base(&h);
    let ok = register_ok(&base, 101);
    let key_id = ok.credential.token_key_id;
    let token = ok.credential.encrypted_token.clone();
    let realms = h.realms().clone();
    let mut v = IdentityVerifier::new(
        KeySource::Remote(KsClient::new(&base, SHARED_KEY)),
        realms.clone(),
        "actor-rtc.local",
    );
    let user = username(101, key_id, &token);
    let t = now();

    assert_eq!(v.verify(t, &user), Err(IdentityError::RealmNotFound));
    provision(&realms, 101, RealmStatus::Normal, None);
    let id = v.verify(t, &user).unwrap();
    // Expired credential.
    assert_eq!(
        v.verify(id.expires_at + 1, &user),
        Err(IdentityError::Expired)
    );
    assert!(
        v.verify(id.expires_at, &user).is_ok(),
        "valid at exactly expr_time"
    );
    // Realm in the username differs from the claims.
    provision(&realms, 102, RealmStatus::Normal, None);
    assert_eq!(
        v.verify(t, &username(102, key_id, &token)),
        Err(IdentityError::RealmMismatch)
    );
    // Realm states.
    provision(&realms, 101, RealmStatus::Suspended, None);
    assert_eq!(v.verify(t, &user), Err(IdentityError::RealmSuspended));
    provision(&realms, 101, RealmStatus::Terminated, None);
    assert_eq!(v.verify(t, &user), Err(IdentityError::RealmTerminated));
    provision(&realms, 101, RealmStatus::Normal, Some(t - 1));
    assert_eq!(v.verify(t, &user), Err(IdentityError::RealmExpired));
    provision(&realms, 101, RealmStatus::Normal, Some(t));
    assert!(v.verify(t, &user).is_ok(), "valid at exactly expires_at");
    // Unknown key; truncated token; too short.
    assert_eq!(
        v.verify(t, &username(101, 9999, &token)),
        Err(IdentityError::UnknownKey)
    );
    assert_eq!(
        v.verify(t, &username(101, key_id, &token[..60])),
        Err(IdentityError::InvalidToken)
    );
    assert_eq!(
        v.verify(t, &crypto::base122_encode(&[0, 0, 0, 101])),
        Err(IdentityError::MalformedUsername)
    );
    // An invalid curve point as ephemeral key.
    let mut bad_point = token.clone();
    bad_point[1..33].fill(0xff);
    assert_eq!(
        v.verify(t, &username(101, key_id, &bad_point)),
        Err(IdentityError::InvalidToken)
    );
}

#[test]
fn register_decodes_and_ignores_the_fields_signaling_reads() {
    // A client's full request (as it reaches the hub) carries a spec, an ACL, a service name
    // and an address: the AIS decodes it and issues from the type and the realm alone.
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let full = RegisterRequest {
        service_spec: Some(ServiceSpec {
            name: "echo-svc".into(),
            fingerprint: "fp-1".into(),
            protobufs: vec![service_spec::Protobuf {
                package: "echo.v1".into(),
                content: "message A {}".into(),
                fingerprint: "p1".into(),
            }],
            ..Default::default()
        }),
        acl: Some(Acl {
            rules: vec![AclRule {
                principals: vec![acl_rule::Principal {
                    realm: Some(PbRealm { realm_id: 7 }),
                    actr_type: Some(request(101).actr_type),
                }],
                permission: acl_rule::ALLOW,
            }],
        }),
        service: Some("echo".into()),
        ws_address: Some("ws://10.0.0.1:9100".into()),
        ..request(101)
    };
    let (st, _, resp) = post_register(&base(&h), &full.encode_to_vec(), &[]);
    assert_eq!(st, 200);
    let Some(register_response::Result::Success(ok)) = resp.result else {
        panic!("{resp:?}")
    };
    assert_eq!(ok.actr_id.realm.realm_id, 101);
    assert_eq!(ok.actr_id.r#type, request(101).actr_type);
}

#[test]
fn malformed_protobuf_gives_error_400() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let (st, _, resp) = post_register(&base(&h), &[0xff, 0xff, 0xff, 0xff], &[]);
    assert_eq!(st, 200);
    match resp.result {
        Some(register_response::Result::Error(e)) => {
            assert_eq!(e.code, 400);
            assert!(e.message.starts_with("Invalid protobuf"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsigned_register_only_from_loopback_and_signed_otherwise() {
    let loop_cfg = actrix_control::AisConfig::default();
    for (ip, allowed) in [
        ("127.0.0.1", true),
        ("127.8.9.10", true),
        ("::1", true),
        ("::ffff:127.0.0.1", true),
        ("10.0.0.1", false),
        ("192.0.2.7", false),
        ("::ffff:10.0.0.1", false),
    ] {
        assert_eq!(
            ais::unsigned_register_allowed(ip.parse().unwrap(), &loop_cfg),
            allowed,
            "{ip}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ais.allow_unsigned_loopback_register = false;
    let h = start(cfg);
    let base = base(&h);
    let body = request(7).encode_to_vec();
    let (st, _, resp) = post_register(&base, &body, &[]);
    assert_eq!(st, 401);
    assert!(matches!(resp.result, Some(register_response::Result::Error(ref e)) if e.code == 401));

    let headers = signed_headers(now(), &ais::register_payload(&body));
    let (st, _, resp) = post_register(&base, &body, &headers);
    assert_eq!(st, 200);
    assert!(matches!(
        resp.result,
        Some(register_response::Result::Success(_))
    ));
    // Replay of the same signed request.
    let (st, _, _) = post_register(&base, &body, &headers);
    assert_eq!(st, 403);
    // Signature over another body.
    let headers = signed_headers(now(), &ais::register_payload(b"other"));
    let (st, _, _) = post_register(&base, &body, &headers);
    assert_eq!(st, 401);
}

fn admin(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let a = agent();
    let url = format!("{base}{path}");
    match method {
        "GET" => {
            let mut r = a.get(url);
            for (k, v) in headers {
                r = r.header(*k, v);
            }
            read_json(r.call())
        }
        "POST" | "PUT" => {
            let mut r = if method == "POST" {
                a.post(url)
            } else {
                a.put(url)
            };
            for (k, v) in headers {
                r = r.header(*k, v);
            }
            read_json(
                r.header("content-type", "application/json")
                    .send(body.unwrap_or("")),
            )
        }
        _ => unreachable!(),
    }
}

#[test]
fn admin_endpoints_require_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let base = base(&h);

    let (st, body) = admin(&base, "POST", "/ais/rotate-key", &[], None);
    assert_eq!(st, 401);
    assert_eq!(body["status"], "error");
    assert_eq!(admin(&base, "GET", "/ais/current-key", &[], None).0, 401);
    let mut bad = signed_headers(now(), "ais_rotate_key");
    bad[2].1 = nonce_sig_of_other();
    assert_eq!(admin(&base, "POST", "/ais/rotate-key", &bad, None).0, 401);
    // A credential signed for current-key does not rotate.
    let h_cur = signed_headers(now(), "ais_current_key");
    assert_eq!(admin(&base, "POST", "/ais/rotate-key", &h_cur, None).0, 401);

    let signed = signed_headers(now(), "ais_rotate_key");
    let (st, body) = admin(&base, "POST", "/ais/rotate-key", &signed, None);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["status"], "success");
    assert_eq!(body["message"], "Key rotated successfully");
    let new_id = body["new_key_id"].as_u64().unwrap();
    assert_eq!(
        admin(&base, "POST", "/ais/rotate-key", &signed, None).0,
        403,
        "replay"
    );

    let (st, body) = admin(
        &base,
        "GET",
        "/ais/current-key",
        &signed_headers(now(), "ais_current_key"),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(
        body,
        serde_json::json!({"status": "success", "key_id": new_id})
    );
    // New registrations use the rotated key.
    assert_eq!(register_ok(&base, 1).credential.token_key_id as u64, new_id);

    // Realm provisioning over the signed admin route.
    let realm_body = r#"{"name": "tenant-55", "status": "Suspended", "expires_at": null}"#;
    assert_eq!(
        admin(&base, "PUT", "/ais/realms/55", &[], Some(realm_body)).0,
        401
    );
    let hdr = signed_headers(now(), &ais::put_realm_payload(55, realm_body.as_bytes()));
    let (st, body) = admin(&base, "PUT", "/ais/realms/55", &hdr, Some(realm_body));
    assert_eq!(st, 200, "{body}");
    let stored = h.realms().get(55).unwrap().unwrap();
    assert_eq!(stored.status, RealmStatus::Suspended);
    let (st, body) = admin(
        &base,
        "GET",
        "/ais/realms/55",
        &signed_headers(now(), "ais_get_realm:55"),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(body["realm"]["name"], "tenant-55");
    let bad_body = r#"{"name": "x", "status": "Bogus"}"#;
    let hdr = signed_headers(now(), &ais::put_realm_payload(56, bad_body.as_bytes()));
    assert_eq!(
        admin(&base, "PUT", "/ais/realms/56", &hdr, Some(bad_body)).0,
        400
    );
}

fn nonce_sig_of_other() -> String {
    actrix_control::nonce_auth::sign(b"some-other-shared-key-000", 1, "x", "y")
}

#[test]
fn ais_rate_limit_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let base = base(&h);
    for i in 0..100 {
        assert_eq!(get(&base, "/ais/health").0, 200, "request {i}");
    }
    let mut resp = agent().get(format!("{base}/ais/health")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let _ = resp.body_mut().read_to_string();
    // Other routes are not limited.
    assert_eq!(get(&base, "/healthz").0, 200);
    assert_eq!(get(&base, "/ks/health").0, 200);
}

#[test]
fn remote_ks_down_gives_503_and_recovers() {
    let port = free_port();
    let ais_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(ais_dir.path());
    cfg.services.ks = false;
    cfg.ks.kek = None;
    cfg.ks.remote_url = Some(format!("http://127.0.0.1:{port}"));
    let (ais_node, probe) = start_with_identity(cfg);
    let ais_base = base(&ais_node);

    let (st, _, resp) = post_register(&ais_base, &request(101).encode_to_vec(), &[]);
    assert_eq!(st, 200);
    match resp.result {
        Some(register_response::Result::Error(e)) => assert_eq!(e.code, 503, "{}", e.message),
        other => panic!("{other:?}"),
    }
    let (_, health) = get(&ais_base, "/ais/health");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["ks_service"], "failed");
    assert_eq!(
        get(&ais_base, "/ks/health").0,
        404,
        "local KS routes are off"
    );

    // The KS comes up on that port: the next register succeeds.
    let ks_dir = tempfile::tempdir().unwrap();
    let mut ks_cfg = ks_config(ks_dir.path());
    ks_cfg.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let ks_node = start(ks_cfg);
    let ok = register_ok(&ais_base, 101);
    let sec = KsClient::new(&base(&ks_node), SHARED_KEY)
        .get_secret_key(ok.credential.token_key_id)
        .unwrap();
    assert!(crypto::ecies_decrypt(&sec.secret_key[..], &ok.credential.encrypted_token).is_ok());
    let (_, health) = get(&ais_base, "/ais/health");
    assert_eq!(health["status"], "healthy", "{health}");

    // TURN identity on the AIS node fetches the key from the remote KS asynchronously.
    provision(ais_node.realms(), 101, RealmStatus::Normal, None);
    let user = username(
        101,
        ok.credential.token_key_id,
        &ok.credential.encrypted_token,
    );
    assert!(probe.ask(&user).is_ok());
    assert_eq!(
        probe.ask(&username(101, 4242, &ok.credential.encrypted_token)),
        Err(IdentityError::UnknownKey.refusal())
    );
    // KS down again: cached key still verifies; unknown keys are "unavailable" (retryable).
    ks_node.shutdown().unwrap();
    assert!(probe.ask(&user).is_ok());
    let e = probe
        .ask(&username(101, 4343, &ok.credential.encrypted_token))
        .unwrap_err();
    assert_eq!(e, IdentityError::KeyUnavailable.refusal());
    assert!(e.retryable);
}

#[test]
fn serials_are_unique_across_threads() {
    let sf = std::sync::Arc::new(Snowflake::new(ais::snowflake::process_worker_id("n")));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sf = sf.clone();
            std::thread::spawn(move || {
                use actrix_control::Clock;
                let clock = SystemClock;
                (0..20_000)
                    .map(|_| sf.next(clock.now_unix_ms()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = HashSet::new();
    for t in threads {
        for s in t.join().unwrap() {
            assert!(s < 1 << 54);
            assert!(all.insert(s), "duplicate serial {s:x}");
        }
    }
    assert_eq!(all.len(), 160_000);
}

const A4_TOKEN: &str = "04466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f276728176c3c6431f8eeda4538dc37c865e2784f3a9e77d044f33e407797e1278a33333333333333333333333333333333d4ba5bd0bb606f6c9f0c59be33b0fb0ef4968e642a5bee5ee66f7f658ac1a905de109027dd541adbfb46873166abdabf36f27ba596a70af8f3281de0614a740eef2c5bf12e5536c0de5e43cf254fd0218c84e35c799a6d6412cadd0f05c6b4f6f52e5d4f6107d7af5e3185e613230f74258cd2ddabc2a461dc8ea7844a8fe4abe15877dd9bf37f500ae59290568868a1abe262a1c4e40bf7183e95b27ba54eb20d4c6ac38c9d4514631d5362bdf67cc78bf104d6135444fb502de040edfa875d17aaafe2";
const A4_USERNAME: &str = "c280c28628c280c2834108666b7f1565317939304d032307056d3003cea008613c1e34144a271ece9417633a717c4e6714056d43631063787736485346706f4832784f04796a3c7768111e3372016f1770497123194c6633194c6633194c6633194c6633194f293a2d741736033d591f061637631d43760e7a2551662129376e2f394d777b16154154413b6104404f5d2a065b3f5a1a0e31332a7b2b795b647b52655470576366280e780c1453501d6f16167e1272546d406f17483c79151f501063104e1a71731a3659022c56741e05632d1e6f29393a4f30417a7a7a786305730464307b504b0c6937353c151143d787297044543f492b70560e7d6c6f667f2802d79914412d083428353e13c7834472027e71417a2b323d69296b1035186a616313542851461d2958575f33730f0b78411a611a51097b280b3c04073775072e45752a7f08";
const A4_CLAIMS: &str = r#"{"realm_id":101,"actor_id":"2c1873c000503@101/acme:echo:1.0.0","expr_time":1767229200,"psk":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31]}"#;

#[test]
fn appendix_a4_full_chain() {
    let secret = [0x11u8; 32];
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .encode(crypto::public_from_secret(&secret).unwrap()),
        "A081W9y3zAr3KO88zrlhXZBoS7Wyyl+FmrDwtwQHWHGq"
    );
    let token = hex::decode(A4_TOKEN).unwrap();
    assert_eq!(token.len(), 277);
    let plain = crypto::ecies_decrypt(&secret, &token).unwrap();
    assert_eq!(std::str::from_utf8(&plain).unwrap(), A4_CLAIMS);
    assert_eq!(plain.len(), 180);
    // Our claims serialization reproduces the JSON byte for byte.
    let claims: IdentityClaims = serde_json::from_slice(&plain).unwrap();
    assert_eq!(serde_json::to_string(&claims).unwrap(), A4_CLAIMS);
    // A tampered tag or ciphertext is refused.
    for pos in [65 + 16, token.len() - 1] {
        let mut t = token.clone();
        t[pos] ^= 1;
        assert!(crypto::ecies_decrypt(&secret, &t).is_err());
    }

    let user = hex::decode(A4_USERNAME).unwrap();
    assert_eq!(user.len(), 326);
    assert_eq!(user, username(101, 7, &token));
    assert_eq!(std::str::from_utf8(&user).unwrap().chars().count(), 317);
    let psk: Vec<u8> = (0..32).collect();
    assert_eq!(
        hex::encode(crypto::turn_key(&user, "actor-rtc.local", &psk)),
        "1c3e286e064347f98eda95611de8b0f6"
    );

    // The verifier end to end, with a stand-in KS (extra routes on a control server) serving
    // the A.4 secret as key 7.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.services.ks = false;
    cfg.services.ais = false;
    let fake_ks = axum::Router::new().route(
        "/ks/secret/{key_id}",
        axum_get(|| async {
            axum::Json(serde_json::json!({
                "key_id": 7,
                "secret_key": base64::engine::general_purpose::STANDARD.encode([0x11u8; 32]),
                "expires_at": 0,
                "tolerance_seconds": 3600,
            }))
        }),
    );
    let h = actrix_control::spawn_with_routes(cfg, None, fake_ks).unwrap();
    provision(h.realms(), 101, RealmStatus::Normal, None);
    let mut v = IdentityVerifier::new(
        KeySource::Remote(KsClient::new(&base(&h), SHARED_KEY)),
        h.realms().clone(),
        "actor-rtc.local",
    );
    let id = v.verify(1_767_225_600, &user).unwrap();
    assert_eq!(hex::encode(id.key), "1c3e286e064347f98eda95611de8b0f6");
    assert_eq!(id.expires_at, 1_767_229_200);
    assert_eq!(id.realm_id, 101);
    assert_eq!(v.verify(1_767_229_201, &user), Err(IdentityError::Expired));
}
