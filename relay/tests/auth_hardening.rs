//! What a black-box probe found and the RFC 8489 cases, against the running appliance:
//! unknown usernames answered as fast as wrong passwords with identity credentials on, 420 for
//! a large unknown comprehension-required attribute, the per-source Binding budget, and the
//! security features announced in the nonce.

mod common;

use actrix_proto::stun::{attr, method, Class, Message, MessageWriter};
use common::{Appliance, Launch, TurnClient};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const REALM: &str = "actor-rtc.local";

fn metrics_text(app: &Appliance) -> String {
    ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn drops(app: &Appliance, reason: &str) -> u64 {
    metrics_text(app)
        .lines()
        .filter(|l| {
            l.starts_with("actrix_drops_total{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Send one authenticated Allocate (after the 401 round trip) exactly once; the answer and
/// how long it took, or None when nothing came within 300 ms.
fn one_try(app: &Appliance, user: &[u8], password: &[u8]) -> (Option<u16>, Duration) {
    let mut c = TurnClient::new(app.stun, user, password, REALM);
    let (tid, bytes) = c.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        false,
    );
    let r = c.transact(&tid, &bytes, 3).expect("401 with a nonce");
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let (tid, bytes) = c.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        true,
    );
    let t0 = Instant::now();
    match c.transact(&tid, &bytes, 1) {
        Some(r) => (Some(r.code().unwrap_or(0)), t0.elapsed()),
        None => (None, t0.elapsed()),
    }
}

#[test]
fn with_identity_credentials_on_an_unknown_user_is_answered_like_a_wrong_password() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        "[turn]\nidentity_credentials = true\nusers = [{ name = \"alice\", password = \"alice-password\" }]\n",
    );
    // Before the fix "mallory" went to the control thread and got its 401 only on the
    // retransmission (~200 ms later), while alice with a wrong password got hers at once.
    for _ in 0..3 {
        let (wrong, t_wrong) = one_try(&app, b"alice", b"not-her-password");
        let (unknown, t_unknown) = one_try(&app, b"mallory", b"anything-at-all");
        assert_eq!(wrong, Some(401));
        assert_eq!(unknown, Some(401), "answered on the first transmission");
        assert!(
            t_wrong < Duration::from_millis(100) && t_unknown < Duration::from_millis(100),
            "{t_wrong:?} / {t_unknown:?}"
        );
    }
    // What an attacker can still tell: a name shaped like an identity credential (base122 of
    // a realm id, a key id and an ECIES token) is resolved off the shard first, whether it
    // exists or not, and nothing about static users.
    let shaped =
        actrix_proto::base122::encode(&[7u8; actrix_proto::auth::IDENTITY_USERNAME_MIN_DECODED]);
    let (first, _) = one_try(&app, &shaped, b"00");
    assert_eq!(
        first, None,
        "an identity-shaped name waits for the control thread"
    );
    let mut c = TurnClient::new(app.stun, &shaped, b"00", REALM);
    assert_eq!(
        c.allocate(10).expect("answered after resolution").code(),
        Some(401)
    );
}

#[test]
fn a_binding_with_a_large_unknown_required_attribute_gets_420() {
    for backend in ["mmsg", "io_uring", "glommio"] {
        large_unknown_attribute(backend);
    }
}

fn large_unknown_attribute(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &format!("[io]\nbackend = \"{backend}\"\n[turn]\n"),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for size in [8usize, 2100, 2600, 3800] {
        let mut req = vec![0u8; 4096];
        let mut w =
            MessageWriter::new(&mut req, method::BINDING, Class::Request, &[size as u8; 12])
                .unwrap();
        w.add(0x7001, &vec![0xAB; size]).unwrap();
        w.add_fingerprint().unwrap();
        let n = w.finish();
        sock.send_to(&req[..n], app.stun).unwrap();
        let mut buf = [0u8; 1500];
        let (len, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{size}: no answer ({e})"));
        let m = Message::parse(&buf[..len]).unwrap();
        assert_eq!(m.class(), Class::Error, "{size}");
        let code = actrix_proto::stun::decode_error_code(m.get(attr::ERROR_CODE).unwrap())
            .unwrap()
            .0;
        assert_eq!(code, 420, "{backend} {size}");
        assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x70, 0x01]);
    }
    assert_eq!(drops(&app, "truncated"), 0);
}

#[test]
fn bindings_are_answered_within_a_per_source_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::launch(
        tmp.path(),
        "[turn]\n",
        Launch {
            sections: &[("stun", "bindings_per_source_per_sec = 5")],
            ..Launch::default()
        },
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Wait for the start of a second so the burst falls into one.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(
        Duration::from_millis(1000 - u64::from(now.subsec_millis())) + Duration::from_millis(20),
    );
    for i in 0..20u8 {
        let mut req = [0u8; 20];
        let n = MessageWriter::new(&mut req, method::BINDING, Class::Request, &[i; 12])
            .unwrap()
            .finish();
        sock.send_to(&req[..n], app.stun).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 512];
    while sock.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    assert_eq!(answered, 5, "five answers in one second");
    assert_eq!(drops(&app, "binding_rate_limited"), 15);
}

#[test]
fn challenges_announce_the_security_features_and_rfc5389_clients_still_authenticate() {
    // With the AIS on, the node generates a REST secret for actr 0.4 TURN credentials, so
    // static users are not the only credentials: no username anonymity then.
    let tmp = tempfile::tempdir().unwrap();
    let users = "identity_credentials = false\nusers = [{ name = \"alice\", password = \"alice-password\" }]\n";
    let app = Appliance::start(tmp.path(), &format!("[turn]\n{users}"));
    let mut c = TurnClient::new(app.stun, b"alice", b"alice-password", REALM);
    let (tid, bytes) = c.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        false,
    );
    let r = c.transact(&tid, &bytes, 3).unwrap();
    assert_eq!(&r.msg().get(attr::NONCE).unwrap()[..13], b"obMatJos2AAAB");
    drop(app);

    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &format!("[services]\nais = false\n[turn]\n{users}"),
    );
    let mut c = TurnClient::new(app.stun, b"alice", b"alice-password", REALM);
    let (tid, bytes) = c.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        false,
    );
    let r = c.transact(&tid, &bytes, 3).unwrap();
    let m = r.msg();
    let nonce = m.get(attr::NONCE).unwrap();
    // Static users only: password algorithms and username anonymity.
    assert_eq!(&nonce[..13], b"obMatJos2AAAD");
    assert_eq!(
        m.get(attr::PASSWORD_ALGORITHMS).unwrap(),
        &[0, 2, 0, 0, 0, 1, 0, 0]
    );
    // An RFC 5389 client (no PASSWORD-ALGORITHM(S)) is processed as MD5 and succeeds.
    c.nonce = nonce.to_vec();
    let (tid, bytes) = c.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        true,
    );
    assert_eq!(c.transact(&tid, &bytes, 3).unwrap().code(), None);
}
