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

/// What the AIS does when signaling refreshes an actor's credential: the same claims (realm,
/// actor id) with a fresh PSK, encrypted anew. Returns the new token and PSK.
fn reissue(app: &Appliance, key_id: u32, token: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use actrix_control::ais::IdentityClaims;
    use actrix_control::crypto;
    use rand::RngCore;
    let shared = std::fs::read_to_string(app.data_dir().join("shared_key")).unwrap();
    let ks = actrix_control::KsClient::new(&format!("http://{}", app.http), shared.trim());
    let secret = ks.get_secret_key(key_id).expect("the KS serves its key");
    let plain = crypto::ecies_decrypt(&secret.secret_key[..], token).unwrap();
    let mut claims: IdentityClaims = serde_json::from_slice(&plain).unwrap();
    let mut psk = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut psk);
    claims.psk = psk.clone();
    let public = crypto::public_from_secret(&secret.secret_key[..]).unwrap();
    let json = serde_json::to_vec(&claims).unwrap();
    (crypto::ecies_encrypt(&public, &json).unwrap(), psk)
}

#[test]
fn rotated_credentials_do_not_get_a_fresh_allocation_quota() {
    // The probe's finding: quotas were counted by the raw USERNAME, so a re-issued identity
    // credential (or a REST username with a new expiry) got a fresh quota. They count by the
    // identity behind the credential: the actor, the REST name.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    provision_realm(
        &data,
        &Realm {
            realm_id: REALM_ID,
            name: "quota".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .unwrap();
    let app = Appliance::start(
        tmp.path(),
        "[turn]\nmax_allocations_per_user = 1\nrest_secrets = [\"quota-rest-secret-0123456789\"]\n",
    );
    let (token, key_id, psk) = register(&app, REALM_ID);
    let first = username(REALM_ID, key_id, &token);
    let mut a = TurnClient::new(
        app.stun,
        &first,
        hex::encode(&psk).as_bytes(),
        "actor-rtc.local",
    );
    assert_eq!(a.allocate(10).expect("answered").code(), None);
    let (token2, psk2) = reissue(&app, key_id, &token);
    let second = username(REALM_ID, key_id, &token2);
    assert_ne!(first, second);
    let mut b = TurnClient::new(
        app.stun,
        &second,
        hex::encode(&psk2).as_bytes(),
        "actor-rtc.local",
    );
    assert_eq!(
        b.allocate(10).expect("answered").code(),
        Some(486),
        "a re-issued credential of the same actor shares its quota"
    );
    // Another actor has a quota of its own.
    let (t3, k3, p3) = register(&app, REALM_ID);
    let mut c = TurnClient::new(
        app.stun,
        &username(REALM_ID, k3, &t3),
        hex::encode(&p3).as_bytes(),
        "actor-rtc.local",
    );
    assert_eq!(c.allocate(10).expect("answered").code(), None);

    // TURN REST: a later expiry is a new USERNAME for the same name.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rest = |expiry: u64, name: &str| {
        let user = format!("{expiry}:{name}");
        let pw =
            actrix_proto::auth::rest_password(b"quota-rest-secret-0123456789", user.as_bytes());
        let mut t = TurnClient::new(app.stun, user.as_bytes(), pw.as_bytes(), "actor-rtc.local");
        t.allocate(3).expect("answered").code()
    };
    assert_eq!(rest(now + 600, "carol"), None);
    assert_eq!(
        rest(now + 601, "carol"),
        Some(486),
        "a rotated REST username"
    );
    assert_eq!(rest(now + 602, "dave"), None);
}
