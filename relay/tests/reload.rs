//! Live reload: SIGHUP and the signed admin endpoint apply new users and peer ranges without
//! dropping allocations; an invalid file is refused with every error and the old settings stay.

mod common;

use actrix_proto::stun::{attr, method};
use common::{Appliance, TurnClient};
use std::net::UdpSocket;
use std::time::Duration;

const BASE: &str = "[turn]\nusers = [{ name = \"alice\", password = \"secret-pass\" }]\nallow_peers = [\"127.0.0.0/8\"]\nidentity_credentials = false\n";

fn rewrite(app: &Appliance, turn: &str) {
    let path = app.dir.join("actrix.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let head = text.split("[turn]").next().unwrap().to_string();
    let range = text
        .lines()
        .find(|l| l.starts_with("relay_port_range"))
        .unwrap()
        .to_string();
    std::fs::write(
        &path,
        format!(
            "{head}{}",
            turn.replace("[turn]\n", &format!("[turn]\n{range}\n"))
        ),
    )
    .unwrap();
}

fn hup(app: &Appliance) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(app.child.id() as i32, libc::SIGHUP) };
}

fn permit_and_echo(c: &mut TurnClient, relay: std::net::SocketAddr) -> bool {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (tid, bytes) = c.signed(
        method::CREATE_PERMISSION,
        &[],
        Some(peer.local_addr().unwrap()),
    );
    if c.transact(&tid, &bytes, 3).and_then(|r| r.code()).is_some() {
        return false;
    }
    peer.send_to(b"still here", relay).unwrap();
    let mut buf = [0u8; 512];
    c.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    matches!(c.sock.recv_from(&mut buf), Ok((n, _)) if n > 20)
}

#[test]
fn sighup_applies_new_users_keeps_allocations_and_refuses_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    let mut alice = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let r = alice.allocate(3).unwrap();
    assert_eq!(r.code(), None);
    let relay = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", "actor-rtc.local");
    assert_eq!(bob.allocate(3).unwrap().code(), Some(401));

    rewrite(
        &app,
        &BASE.replace(
            "users = [",
            "users = [{ name = \"bob\", password = \"bob-password\" }, ",
        ),
    );
    hup(&app);
    app.wait_log("configuration reloaded");
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", "actor-rtc.local");
    assert_eq!(
        bob.allocate(3).unwrap().code(),
        None,
        "bob exists after the reload"
    );
    assert!(
        permit_and_echo(&mut alice, relay),
        "alice's allocation survived the reload"
    );

    // An invalid file: every error logged, old configuration in force.
    rewrite(&app, "[turn]\nusers = [{ name = \"carol\", password = \"x\" }]\nrelay_port_range = \"9-1\"\nbogus = 1\n");
    hup(&app);
    app.wait_log("new configuration refused");
    let mut carol = TurnClient::new(app.stun, b"carol", b"x", "actor-rtc.local");
    assert_eq!(carol.allocate(3).unwrap().code(), Some(401));
    let mut bob2 = TurnClient::new(app.stun, b"bob", b"bob-password", "actor-rtc.local");
    assert_eq!(
        bob2.allocate(3).unwrap().code(),
        None,
        "old configuration still in force"
    );
}

#[test]
fn admin_reload_endpoint_requires_a_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    let url = format!("http://{}/admin/reload", app.http);
    let unsigned = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_empty()
        .unwrap();
    assert_eq!(unsigned.status(), 401);

    rewrite(
        &app,
        &BASE.replace(
            "users = [",
            "users = [{ name = \"dave\", password = \"dave-password\" }, ",
        ),
    );
    let key = std::fs::read_to_string(app.data_dir().join("shared_key")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cred =
        actrix_control::nonce_auth::make_credential(now, key.trim().as_bytes(), "admin_reload");
    let mut resp = ureq::post(&url)
        .header("x-actrix-timestamp", &cred.timestamp.to_string())
        .header("x-actrix-nonce", &cred.nonce)
        .header("x-actrix-signature", &cred.signature)
        .send_empty()
        .expect("signed reload");
    assert_eq!(resp.status(), 200);
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let mut dave = TurnClient::new(app.stun, b"dave", b"dave-password", "actor-rtc.local");
    assert_eq!(dave.allocate(3).unwrap().code(), None);
    // Replaying the same signed request is refused.
    let replay = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("x-actrix-timestamp", &cred.timestamp.to_string())
        .header("x-actrix-nonce", &cred.nonce)
        .header("x-actrix-signature", &cred.signature)
        .send_empty()
        .unwrap();
    assert_eq!(replay.status(), 403);
}

#[test]
fn sighup_changes_rate_limits_and_signaling_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    let answered = |app: &Appliance| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut n = 0;
        for i in 0..20u8 {
            let mut buf = [0u8; 64];
            let mut w = actrix_proto::stun::MessageWriter::new(
                &mut buf,
                method::ALLOCATE,
                actrix_proto::stun::Class::Request,
                &[i; 12],
            )
            .unwrap();
            w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).unwrap();
            let len = w.finish();
            sock.send_to(&buf[..len], app.stun).unwrap();
        }
        let mut buf = [0u8; 512];
        while sock.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    // Default: 50 challenges per source per second, so all 20 are answered.
    assert_eq!(answered(&app), 20);
    rewrite(
        &app,
        &format!(
            "{BASE}challenges_per_source_per_sec = 3\n[signaling]\nmax_conns_per_ip = 1\n[ais]\nrate_limit_burst = 2\nrate_limit_refill_secs = 600\n"
        ),
    );
    hup(&app);
    app.wait_log("configuration reloaded");
    app.wait_log("signaling: limits updated");
    // The AIS per-IP bucket: two requests, then 429.
    let ais = format!("http://{}/ais/health", app.http);
    let codes: Vec<u16> = (0..3)
        .map(|_| {
            ureq::get(&ais)
                .config()
                .http_status_as_error(false)
                .build()
                .call()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(codes, vec![200, 200, 429]);
    std::thread::sleep(Duration::from_millis(1100)); // a fresh one-second window
    assert_eq!(answered(&app), 3, "the new per-source limit is in force");
    // The signaling limit applies to new connections: a second concurrent one gets 429.
    let url = format!("ws://{}/signaling/ws", app.http);
    let (_first, _) = tungstenite::connect(&url).expect("first connection");
    match tungstenite::connect(&url) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
}
