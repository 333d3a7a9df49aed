//! The TURN credential of an actr 0.4 registration against the running binary, with no REST
//! secret configured (the control plane generates one and hands it to TURN): the
//! `turn_credential` of `POST /ais/register` allocates over UDP, TCP and TLS, a tampered
//! password is refused with 401, and the shards never ask the control thread (the identity
//! lookup counters stay at 0: the check is the REST HMAC alone, control/WIRE-0.4.md section 5).

mod common;

use actrix_control::{provision_realm, Realm, RealmStatus};
use actrix_wire::v4::actr as p4;
use common::{tls_client_config, Appliance, StreamClient, TurnClient};
use prost::Message as _;

const REALM: &str = "actor-rtc.local";

fn register(http: std::net::SocketAddr, realm: u32) -> p4::TurnCredential {
    let body = p4::RegisterRequest {
        actr_type: p4::ActrType {
            manufacturer: "acme".into(),
            name: "echo".into(),
            version: "1.0.0".into(),
        },
        realm: p4::Realm { realm_id: realm },
        auth_mode: Some(p4::RegisterAuthMode::Linked as i32),
        ..Default::default()
    }
    .encode_to_vec();
    let mut resp = ureq::post(&format!("http://{http}/ais/register"))
        .header("content-type", "application/x-protobuf")
        .header("accept", "application/x-protobuf")
        .send(&body[..])
        .expect("POST /ais/register");
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp.body_mut().read_to_vec().unwrap();
    match p4::RegisterResponse::decode(&bytes[..]).unwrap().result {
        Some(p4::register_response::Result::Success(ok)) => ok.turn_credential,
        other => panic!("not registered: {other:?}"),
    }
}

/// The sum of every series of the identity-lookup counters, and how many series there were.
fn identity_lookups(http: std::net::SocketAddr) -> (f64, usize) {
    let body = ureq::get(&format!("http://{http}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| {
            l.starts_with("actrix_identity_resolutions")
                || l.starts_with("actrix_identity_decryptions")
        })
        .collect();
    let sum = lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    (sum, lines.len())
}

#[test]
fn a_0_4_turn_credential_allocates_over_udp_tcp_and_tls_without_the_control_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    provision_realm(
        &data,
        &Realm {
            realm_id: 9,
            name: "edge".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["cert", "--self-signed", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let tls_port = common::free_tcp_port();
    let app = Appliance::start_stun(
        tmp.path(),
        &format!(
            "listen_tcp = [\"127.0.0.1:{{port}}\"]\nlisten_tls = [\"127.0.0.1:{tls_port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        "[turn]\nallow_peers = [\"127.0.0.0/8\"]\n",
    );
    assert!(
        data.join("turn_rest_secret").exists(),
        "no REST secret configured: the control plane generated one"
    );

    let cred = register(app.http, 9);
    let (user, pass) = (cred.username.as_bytes(), cred.password.as_bytes());
    let (expiry, _) = cred
        .username
        .split_once(':')
        .expect("<expires_at>:<actor_id>");
    assert_eq!(
        expiry.parse::<u64>().ok(),
        Some(cred.expires_at),
        "{}",
        cred.username
    );
    let mut udp = TurnClient::new(app.stun, user, pass, REALM);
    assert_eq!(udp.allocate(3).expect("answered").code(), None, "UDP");
    let mut tcp = StreamClient::connect_tcp(app.stun, user, pass, REALM);
    tcp.allocate_relayed();
    let (mut tls, _) = StreamClient::connect_tls(
        ([127, 0, 0, 1], tls_port).into(),
        tls_client_config(&[b"stun.turn"]),
        user,
        pass,
        REALM,
    );
    tls.allocate_relayed();

    // Another registration's credential with this one's password: refused.
    let other = register(app.http, 9);
    assert_ne!(other.username, cred.username);
    let mut forged = TurnClient::new(app.stun, other.username.as_bytes(), pass, REALM);
    assert_eq!(forged.allocate(3).expect("answered").code(), Some(401));

    let (lookups, series) = identity_lookups(app.http);
    assert!(series > 0, "the identity-lookup counters are exported");
    assert_eq!(lookups, 0.0, "no 0.4 credential went to the control thread");
}
