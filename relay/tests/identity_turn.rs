//! Actrix identity credentials in TURN, end to end: register through `/ais/register` on the
//! running appliance, build the base122 username, allocate and relay with it; tampered,
//! wrong-realm, suspended-realm and unknown-key credentials get 401.

mod common;

use actrix_control::ais::proto::{register_response, ActrType, RegisterRequest, RegisterResponse};
use actrix_control::{provision_realm, Realm, RealmStatus};
use actrix_proto::stun::{attr, method};
use common::{Appliance, TurnClient};
use prost::Message as _;
use std::net::UdpSocket;
use std::time::Duration;

const REALM_ID: u32 = 101;

fn register(app: &Appliance, realm_id: u32) -> (Vec<u8>, u32, Vec<u8>) {
    let req = RegisterRequest {
        actr_type: ActrType {
            manufacturer: "acme".into(),
            name: "echo".into(),
            version: Some("1.0.0".into()),
        },
        realm: actrix_control::ais::proto::Realm { realm_id },
        ..Default::default()
    };
    let url = format!("http://{}/ais/register", app.http);
    let mut resp = ureq::post(&url)
        .header("content-type", "application/octet-stream")
        .send(&req.encode_to_vec()[..])
        .expect("register");
    let body = resp.body_mut().read_to_vec().unwrap();
    let r = RegisterResponse::decode(&body[..]).unwrap();
    match r.result {
        Some(register_response::Result::Success(ok)) => (
            ok.credential.encrypted_token,
            ok.credential.token_key_id,
            ok.psk.expect("psk"),
        ),
        other => panic!("register failed: {other:?}"),
    }
}

fn username(realm_id: u32, key_id: u32, token: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&realm_id.to_be_bytes());
    raw.extend_from_slice(&key_id.to_be_bytes());
    raw.extend_from_slice(token);
    actrix_control::crypto::base122_encode(&raw)
}

#[test]
fn identity_credentials_allocate_and_relay_and_bad_ones_get_401() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    let data = tmp.path().join("data");
    for (id, status) in [
        (REALM_ID, RealmStatus::Normal),
        (202, RealmStatus::Suspended),
        (303, RealmStatus::Normal),
    ] {
        provision_realm(
            &data,
            &Realm {
                realm_id: id,
                name: format!("r{id}"),
                status,
                expires_at: None,
            },
        )
        .unwrap();
    }
    let app = Appliance::start(tmp.path(), "[turn]\nallow_peers = [\"127.0.0.0/8\"]\n");
    let (token, key_id, psk) = register(&app, REALM_ID);
    let user = username(REALM_ID, key_id, &token);
    let password = hex::encode(&psk);

    // The first authenticated Allocate is resolved on the control thread; the client's
    // retransmission (transact retries) then succeeds from the shard's cache.
    let mut c = TurnClient::new(app.stun, &user, password.as_bytes(), "actor-rtc.local");
    let r = c.allocate(10).expect("allocate answered");
    assert_eq!(
        r.code(),
        None,
        "allocate with an identity credential succeeds"
    );
    assert!(r.msg().verify_integrity(&c.key));
    let relay = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();

    // Relay through it: permission to a local peer, peer → client as a Data indication.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (tid, bytes) = c.signed(method::CREATE_PERMISSION, &[], Some(peer_addr));
    let r = c.transact(&tid, &bytes, 3).expect("permission answered");
    assert_eq!(r.code(), None, "permission created");
    peer.send_to(b"hello identity", relay).unwrap();
    let mut buf = [0u8; 1500];
    c.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).expect("data indication");
    let m = actrix_proto::stun::Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.get(attr::DATA).unwrap(), b"hello identity");

    // Tampered token: one byte of the ciphertext flipped.
    let mut bad = token.clone();
    bad[100] ^= 1;
    expect_401(&app, &username(REALM_ID, key_id, &bad), &password);
    // Wrong realm in the username (the claims say 101).
    expect_401(&app, &username(303, key_id, &token), &password);
    // Unknown key id.
    expect_401(&app, &username(REALM_ID, key_id + 1000, &token), &password);
    // Right credential, wrong password.
    expect_401(&app, &user, &"00".repeat(32));
    // A suspended realm is refused even with a valid credential for it.
    let (t2, k2, p2) = register(&app, 202);
    expect_401(&app, &username(202, k2, &t2), &hex::encode(p2));
}

fn expect_401(app: &Appliance, user: &[u8], password: &str) {
    let mut c = TurnClient::new(app.stun, user, password.as_bytes(), "actor-rtc.local");
    // Retransmit for up to ~3 s: the first try may be dropped while the control thread
    // resolves the username; the answer must then be 401, never success.
    let r = c.allocate(10).expect("an answer after resolution");
    assert_eq!(
        r.code(),
        Some(401),
        "username {:?}",
        String::from_utf8_lossy(&user[..8.min(user.len())])
    );
}

fn metrics_text(app: &Appliance) -> String {
    ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The value of an unlabelled counter on `/metrics`.
fn metric(app: &Appliance, name: &str) -> u64 {
    metrics_text(app)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_flood_of_allocates_with_one_identity_costs_one_decryption_and_one_key_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    provision_realm(
        &data,
        &Realm {
            realm_id: REALM_ID,
            name: "flood".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .unwrap();
    // All clients come from 127.0.0.1: lift the per-source challenge limit for the flood.
    let app = Appliance::start(
        tmp.path(),
        "[turn]\nallow_peers = [\"127.0.0.0/8\"]\nchallenges_per_source_per_sec = 100000\n",
    );
    let (token, key_id, psk) = register(&app, REALM_ID);
    let user = username(REALM_ID, key_id, &token);
    let password = hex::encode(&psk);
    assert_eq!(metric(&app, "actrix_identity_decryptions_total"), 0);
    // 60 clients (60 5-tuples), each with the 401 round trip and an authenticated Allocate.
    for i in 0..60 {
        let mut c = TurnClient::new(app.stun, &user, password.as_bytes(), "actor-rtc.local");
        let r = c.allocate(10).expect("allocate answered");
        assert_eq!(r.code(), None, "client {i}");
    }
    // Each shard asks the control thread once for this username (then answers from its
    // cache); the control thread decrypts once per question and fetches the key once.
    let shards = metrics_text(&app)
        .lines()
        .filter(|l| l.starts_with("actrix_allocations_active{"))
        .count() as u64;
    assert!(shards >= 1);

    let resolutions = metric(&app, "actrix_identity_resolutions_total");
    assert!(
        (1..=shards).contains(&resolutions),
        "{resolutions} for {shards} shard(s)"
    );
    assert_eq!(
        metric(&app, "actrix_identity_decryptions_total"),
        resolutions
    );

    assert_eq!(metric(&app, "actrix_identity_key_fetches_total"), 1);
}
