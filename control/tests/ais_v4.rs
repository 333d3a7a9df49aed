//! The AIS for actr 0.4 clients over real HTTP (control/WIRE-0.4.md): version detection on
//! `POST /ais/register`, the Ed25519 credential, the TURN REST credential, renewal with
//! single-use tokens, and every refusal with its code.

mod common;

use actrix_control::ais::signing::SigningKeys;
use actrix_control::ais::{is_v4_register, proto as p1};
use actrix_control::{ManualClock, Realm, RealmStatus};
use actrix_wire::v4::actr as p4;
use common::*;
use prost::Message as _;

const T0: u64 = 1_767_225_600;

fn v4_request(realm: u32) -> p4::RegisterRequest {
    p4::RegisterRequest {
        actr_type: p4::ActrType {
            manufacturer: "acme".into(),
            name: "echo".into(),
            version: "1.0.0".into(),
        },
        realm: p4::Realm { realm_id: realm },
        auth_mode: Some(p4::RegisterAuthMode::Linked as i32),
        ..Default::default()
    }
}

/// POST `body` to `path` as actr-hyper 0.4's AisClient does.
fn post_v4(base: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut resp = agent()
        .post(format!("{base}{path}"))
        .header("content-type", "application/x-protobuf")
        .header("accept", "application/x-protobuf")
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_vec().unwrap())
}

fn register(base: &str, req: &p4::RegisterRequest) -> p4::register_response::Result {
    let (st, bytes) = post_v4(base, "/ais/register", &req.encode_to_vec());
    assert_eq!(st, 200);
    p4::RegisterResponse::decode(&bytes[..])
        .expect("a 0.4 RegisterResponse")
        .result
        .expect("a result")
}

fn register_ok(base: &str, realm: u32) -> p4::register_response::RegisterOk {
    match register(base, &v4_request(realm)) {
        p4::register_response::Result::Success(ok) => ok,
        p4::register_response::Result::Error(e) => panic!("refused: {e:?}"),
    }
}

fn renew(base: &str, id: &p4::ActrId, token: &[u8]) -> p4::renew_credential_response::Result {
    let req = p4::RenewCredentialRequest {
        actr_id: id.clone(),
        renewal_token: token.to_vec(),
    };
    let (st, bytes) = post_v4(base, "/ais/renew", &req.encode_to_vec());
    assert_eq!(st, 200);
    p4::RenewCredentialResponse::decode(&bytes[..])
        .unwrap()
        .result
        .unwrap()
}

fn renew_error(base: &str, id: &p4::ActrId, token: &[u8]) -> p4::ErrorResponse {
    match renew(base, id, token) {
        p4::renew_credential_response::Result::Error(e) => e,
        p4::renew_credential_response::Result::Success(ok) => panic!("renewed: {ok:?}"),
    }
}

fn provision(h: &actrix_control::ControlHandle, id: u32) {
    h.realms()
        .upsert(&Realm {
            realm_id: id,
            name: format!("realm-{id}"),
            status: RealmStatus::Normal,
            expires_at: None,
        })
        .unwrap();
}

/// What a 0.4 client checks of its credential.
fn check_credential(ok: &p4::register_response::RegisterOk, now: u64) -> p4::IdentityClaims {
    let claims = p4::IdentityClaims::decode(&ok.credential.claims[..]).unwrap();
    assert_eq!(ok.credential.key_id, ok.signing_key_id);
    let pubkey: [u8; 32] = ok.signing_pubkey[..].try_into().unwrap();
    assert!(SigningKeys::verify_with(
        &pubkey,
        &ok.credential.claims,
        &ok.credential.signature
    ));
    assert_eq!(ok.credential.signature.len(), 64);
    assert_eq!(claims.realm_id, ok.actr_id.realm.realm_id);
    assert_eq!(
        claims.actor_id,
        format!(
            "{:x}@{}/acme:echo:1.0.0",
            ok.actr_id.serial_number, ok.actr_id.realm.realm_id
        )
    );
    assert_eq!(claims.expires_at, now + 3600);
    assert_eq!(
        ok.credential_expires_at.unwrap().seconds as u64,
        claims.expires_at
    );
    // TURN: the coturn REST form under the TURN server's secret, verifiable by HMAC alone.
    let t = &ok.turn_credential;
    assert_eq!(
        t.username,
        format!("{}:{}", claims.expires_at, claims.actor_id)
    );
    assert_eq!(t.expires_at, claims.expires_at);
    assert_eq!(
        t.password,
        actrix_proto::auth::rest_password(
            actrix_control::testing::TURN_SECRET.as_bytes(),
            t.username.as_bytes()
        )
    );
    assert!(ok.renewal_token.as_ref().is_some_and(|t| !t.is_empty()));
    claims
}

#[test]
fn the_protocol_is_told_apart_by_content_type_or_0_4_only_fields() {
    let mut h = axum::http::HeaderMap::new();
    let v1 = p1::RegisterRequest::default().encode_to_vec();
    assert!(!is_v4_register(&h, &v1));
    // A 0.4 request carrying only fields both versions define, but the 0.4 client's header.
    h.insert("content-type", "application/x-protobuf".parse().unwrap());
    assert!(is_v4_register(&h, &v1));
    // A 0.4-only field (auth_mode, 14) without the header.
    let h = axum::http::HeaderMap::new();
    assert!(is_v4_register(&h, &v4_request(1).encode_to_vec()));
    let mut plain = v4_request(1);
    plain.auth_mode = None;
    assert!(!is_v4_register(&h, &plain.encode_to_vec()));
}

#[test]
fn register_and_renew_a_0_4_actor() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(config(dir.path()), &clock);
    let base = base(&h);

    // No realm yet: 403, like the 0.1.7 path's realm check.
    match register(&base, &v4_request(101)) {
        p4::register_response::Result::Error(e) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(e.message.starts_with("Realm validation failed"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    provision(&h, 101);
    let ok = register_ok(&base, 101);
    let claims = check_credential(&ok, T0);
    let other = register_ok(&base, 101);
    assert_ne!(other.actr_id.serial_number, ok.actr_id.serial_number);

    // The 0.1.7 API on the same node still answers with an ECIES token and a PSK.
    let (st, bytes) = {
        let mut resp = agent()
            .post(format!("{base}/ais/register"))
            .header("content-type", "application/octet-stream")
            .send(
                &p1::RegisterRequest {
                    actr_type: p1::ActrType {
                        manufacturer: "acme".into(),
                        name: "old".into(),
                        version: None,
                    },
                    realm: p1::Realm { realm_id: 101 },
                    ..Default::default()
                }
                .encode_to_vec()[..],
            )
            .unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_vec().unwrap(),
        )
    };
    assert_eq!(st, 200);
    match p1::RegisterResponse::decode(&bytes[..]).unwrap().result {
        Some(p1::register_response::Result::Success(old)) => {
            assert_eq!(old.psk.map(|p| p.len()), Some(32));
            assert!(old.credential.encrypted_token.len() > 97);
        }
        other => panic!("{other:?}"),
    }

    // Renewal: same ActrId, a fresh credential, a successor token.
    clock.advance(1800);
    let token = ok.renewal_token.clone().unwrap();
    let renewed = match renew(&base, &ok.actr_id, &token) {
        p4::renew_credential_response::Result::Success(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(renewed.actr_id, ok.actr_id);
    let c2 = check_credential(&renewed, T0 + 1800);
    assert_eq!(c2.actor_id, claims.actor_id);
    let successor = renewed.renewal_token.clone().unwrap();
    assert_ne!(successor, token);

    // The used token again: replay, refused.
    let e = renew_error(&base, &ok.actr_id, &token);
    assert_eq!(
        (e.code, e.message.as_str()),
        (401, "Renewal token already used")
    );
    // A token of someone else, or altered: rejected.
    let e = renew_error(&base, &other.actr_id, &successor);
    assert_eq!(
        (e.code, e.message.as_str()),
        (401, "Renewal token rejected")
    );
    let mut forged = successor.clone();
    forged[40] ^= 1;
    assert_eq!(renew_error(&base, &ok.actr_id, &forged).code, 401);
    // Undecodable request: 400.
    let (st, bytes) = post_v4(&base, "/ais/renew", b"\xff\xff\xff");
    assert_eq!(st, 200);
    match p4::RenewCredentialResponse::decode(&bytes[..])
        .unwrap()
        .result
    {
        Some(p4::renew_credential_response::Result::Error(e)) => assert_eq!(e.code, 400),
        other => panic!("{other:?}"),
    }
    // After its expiry (one day by default), even an unused token is refused.
    clock.advance(86_400);
    let e = renew_error(&base, &ok.actr_id, &successor);
    assert_eq!((e.code, e.message.as_str()), (401, "Renewal token expired"));
    // The other actor's token is past expiry too.
    let e = renew_error(&base, &other.actr_id, other.renewal_token.as_ref().unwrap());
    assert_eq!(e.code, 401);
}

#[test]
fn a_suspended_realm_stops_renewal_and_bad_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(config(dir.path()), &clock);
    let base = base(&h);
    provision(&h, 7);
    let ok = register_ok(&base, 7);
    h.realms()
        .upsert(&Realm {
            realm_id: 7,
            name: "realm-7".into(),
            status: RealmStatus::Suspended,
            expires_at: None,
        })
        .unwrap();
    let e = renew_error(&base, &ok.actr_id, ok.renewal_token.as_ref().unwrap());
    assert_eq!(e.code, 403, "{e:?}");
    provision(&h, 7);
    // The refused attempt did not consume the token.
    assert!(matches!(
        renew(&base, &ok.actr_id, ok.renewal_token.as_ref().unwrap()),
        p4::renew_credential_response::Result::Success(_)
    ));
    for (m, n, v) in [
        ("acme", "echo", ""),
        ("1acme", "echo", "1"),
        ("acme", "echo", "1:2"),
    ] {
        let mut req = v4_request(7);
        req.actr_type = p4::ActrType {
            manufacturer: m.into(),
            name: n.into(),
            version: v.into(),
        };
        match register(&base, &req) {
            p4::register_response::Result::Error(e) => assert_eq!(e.code, 400, "{m} {n} {v}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn signing_keys_rotate_and_old_credentials_stay_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(config(dir.path()), &clock);
    let base = base(&h);
    provision(&h, 9);
    let first = register_ok(&base, 9);
    // A signed admin request forces a rotation.
    let headers = signed_headers(T0, "ais_rotate_signing_key");
    let mut req = agent().post(format!("{base}/ais/rotate-signing-key"));
    for (k, v) in &headers {
        req = req.header(*k, v);
    }
    let (st, body) = read_json(req.send_empty());
    assert_eq!(st, 200, "{body}");
    let new_id = body["new_key_id"].as_u64().unwrap() as u32;
    assert_ne!(new_id, first.signing_key_id);
    let second = register_ok(&base, 9);
    assert_eq!(second.signing_key_id, new_id);
    // Unsigned: refused.
    let (st, _) = read_json(
        agent()
            .post(format!("{base}/ais/rotate-signing-key"))
            .send_empty(),
    );
    assert_eq!(st, 401);
    // Both keys survive a restart, sealed under the KEK.
    drop(h);
    let cfg = config(dir.path());
    let keys = SigningKeys::open(
        &dir.path().join(actrix_control::config::AIS_SIGNING_DB_FILE),
        &actrix_control::crypto::Kek::parse(KEK_HEX).unwrap(),
        cfg.ais.signing_key_ttl_secs,
        cfg.ais.signing_key_tolerance_secs,
        cfg.ais.key_refresh_ahead_secs,
    )
    .unwrap();
    for ok in [&first, &second] {
        assert!(keys
            .verify(
                T0,
                ok.credential.key_id,
                &ok.credential.claims,
                &ok.credential.signature
            )
            .is_ok());
    }
    assert!(SigningKeys::open(
        &dir.path().join(actrix_control::config::AIS_SIGNING_DB_FILE),
        &actrix_control::crypto::Kek::from_bytes([1; 32]),
        86_400,
        3600,
        600,
    )
    .is_err());
}
