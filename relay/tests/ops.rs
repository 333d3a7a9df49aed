//! Operations against the real binary: load spreading (300 Try Alternate with
//! ALTERNATE-SERVER while draining or over the allocation limit), `/livez` and `/readyz`, and
//! the session admin commands (`actrix sessions`, `disconnect`, `drain`, `undrain`).

mod common;

use actrix_proto::stun::{attr, method};
use common::{Appliance, TurnClient};
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

const BASE: &str = "[turn]\nusers = [{ name = \"alice\", password = \"alice-pass\" }, { name = \"bob\", password = \"bob-password\" }]\nallow_peers = [\"127.0.0.0/8\"]\nidentity_credentials = false\nalternate_servers = [\"192.0.2.7:3478\", \"[2001:db8::7]:3479\"]\n";
const REALM: &str = "actor-rtc.local";

fn get(app: &Appliance, path: &str) -> (u16, String) {
    let mut r = ureq::get(&format!("http://{}{path}", app.http))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// `actrix <args> -c <the node's config>`: exit status and stdout.
fn actrix(app: &Appliance, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(args)
        .arg("-c")
        .arg(app.dir.join("actrix.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actrix {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Bind channel 0x4000 to `peer` and return a function sending ChannelData through it.
fn bind_channel(c: &mut TurnClient, peer: SocketAddr) {
    let (_, b) = c.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0, 0, 0])],
        Some(peer),
    );
    c.expect_ok(&b);
}

fn relays(c: &TurnClient, peer: &UdpSocket, payload: &[u8]) -> bool {
    let mut frame = vec![0x40, 0x00, 0, payload.len() as u8];
    frame.extend_from_slice(payload);
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        c.sock.send_to(&frame, c.server).unwrap();
        if let Ok((n, _)) = peer.recv_from(&mut buf) {
            if &buf[..n] == payload {
                return true;
            }
        }
    }
    false
}

fn peer() -> UdpSocket {
    let p = UdpSocket::bind("127.0.0.1:0").unwrap();
    p.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    p
}

#[test]
fn drain_redirects_new_allocations_and_keeps_existing_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    assert_eq!(get(&app, "/livez").0, 200);
    assert_eq!(get(&app, "/readyz"), (200, "{\"ready\":true}".into()));

    let peer = peer();
    let mut alice = TurnClient::new(app.stun, b"alice", b"alice-pass", REALM);
    alice.allocate_relayed();
    bind_channel(&mut alice, peer.local_addr().unwrap());
    assert!(relays(&alice, &peer, b"before the drain"));

    actrix(&app, &["drain"]);
    let (status, body) = get(&app, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");

    // A new Allocate: 300 with the IPv4 alternate (the client's family), integrity-protected.
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", REALM);
    let r = bob.allocate(3).expect("answered");
    assert_eq!(r.code(), Some(300));
    let m = r.msg();
    // RFC 8489 §14.15: MAPPED-ADDRESS encoding, not XOR: family 1, port 3478, 192.0.2.7.
    assert_eq!(
        m.get(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER"),
        &[0, 1, 0x0d, 0x96, 192, 0, 2, 7]
    );
    assert!(
        m.get(attr::ALTERNATE_DOMAIN).is_none(),
        "UDP needs no domain"
    );
    assert!(
        m.verify_integrity(&bob.key),
        "the 300 is integrity-protected"
    );
    // An unauthenticated Allocate learns nothing: 401, no alternate.
    let mut anon = TurnClient::new(app.stun, b"bob", b"bob-password", REALM);
    let (tid, b) = anon.build(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        false,
    );
    let r = anon.transact(&tid, &b, 3).unwrap();
    assert_eq!(r.code(), Some(401));
    assert!(r.msg().get(attr::ALTERNATE_SERVER).is_none());

    // The existing allocation keeps relaying and refreshing.
    assert!(relays(&alice, &peer, b"during the drain"));
    let r = alice
        .call(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            3,
        )
        .unwrap();
    assert_eq!(r.code(), None);

    let (_, metrics) = get(&app, "/metrics");
    assert!(
        metrics.contains("actrix_allocations_redirected_total{shard=\"0\"} 1"),
        "{metrics}"
    );

    actrix(&app, &["undrain"]);
    assert_eq!(get(&app, "/readyz").0, 200);
    assert_eq!(bob.allocate(3).unwrap().code(), None);
}

#[test]
fn over_the_allocation_limit_redirects() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &BASE.replace("[turn]\n", "[turn]\nredirect_above_allocations = 1\n"),
    );
    let mut alice = TurnClient::new(app.stun, b"alice", b"alice-pass", REALM);
    alice.allocate_relayed();
    let (status, body) = get(&app, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("over the allocation limit"), "{body}");
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", REALM);
    let r = bob.allocate(3).unwrap();
    assert_eq!(r.code(), Some(300));
    assert_eq!(
        r.msg().get(attr::ALTERNATE_SERVER).unwrap(),
        &[0, 1, 0x0d, 0x96, 192, 0, 2, 7]
    );
}

#[test]
fn sessions_lists_and_disconnect_ends_an_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    let peer = peer();
    let mut alice = TurnClient::new(app.stun, b"alice", b"alice-pass", REALM);
    let relayed = alice.allocate_relayed();
    bind_channel(&mut alice, peer.local_addr().unwrap());
    assert!(relays(&alice, &peer, b"twelve bytes"));
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", REALM);
    bob.allocate_relayed();

    let (_, out) = actrix(&app, &["sessions", "--json", "--user", "alice"]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 1, "{out}");
    let s = &v[0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["client"], alice.sock.local_addr().unwrap().to_string());
    assert_eq!(s["transport"], "udp");
    assert_eq!(s["relayed"][0], relayed.to_string());
    assert!(s["bytes_to_peer"].as_u64().unwrap() >= 12, "{s}");
    let (_, table) = actrix(&app, &["sessions"]);
    assert!(table.contains("alice") && table.contains("bob"), "{table}");
    assert!(table.contains("2 allocation(s)"), "{table}");
    let (_, out) = actrix(&app, &["users", "--json", "--top", "1"]);
    let users: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(users.len(), 1, "{out}");
    let (_, out) = actrix(&app, &["users", "--json"]);
    let users: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let a = users.iter().find(|u| u["user"] == "alice").expect("alice");
    assert_eq!(a["allocations"], 1);
    assert!(a["bytes_to_peer"].as_u64().unwrap() >= 12, "{a}");

    let (_, out) = actrix(&app, &["disconnect", "--user", "alice"]);
    assert!(out.contains("\"disconnected\":1"), "{out}");
    let r = alice
        .call(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            3,
        )
        .unwrap();
    assert_eq!(r.code(), Some(437));
    // By id: bob's.
    let (_, out) = actrix(&app, &["sessions", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 1, "{out}");
    let id = v[0]["id"].as_str().unwrap().to_owned();
    let (_, out) = actrix(&app, &["disconnect", "--allocation", &id]);
    assert!(out.contains("\"disconnected\":1"), "{out}");
    let (_, out) = actrix(&app, &["sessions", "--json"]);
    assert_eq!(out.trim(), "[]");
}

#[test]
fn admin_routes_need_a_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(tmp.path(), BASE);
    for path in [
        "/admin/sessions",
        "/admin/disconnect",
        "/admin/drain",
        "/admin/undrain",
    ] {
        let r = ureq::post(&format!("http://{}{path}", app.http))
            .config()
            .http_status_as_error(false)
            .build()
            .send("user=alice")
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
}

#[test]
fn sigterm_drains_readyz_and_closes_signaling_with_going_away() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &BASE.replace("[turn]\n", "[turn]\nshutdown_grace_secs = 10\n"),
    );
    let (mut ws, _) =
        tungstenite::connect(format!("ws://{}/signaling/ws", app.http)).expect("upgrade");
    // An allocation keeps the node draining after SIGTERM.
    let mut alice = TurnClient::new(app.stun, b"alice", b"alice-pass", REALM);
    alice.allocate_relayed();
    assert_eq!(get(&app, "/readyz").0, 200);
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(app.child.id() as i32, libc::SIGTERM) };
    app.wait_log("signaling connections closed");
    let close = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(f)) => break f,
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    let f = close.expect("a close frame with a code");
    assert_eq!(u16::from(f.code), 1001, "{f:?}");
    let (status, body) = get(&app, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(get(&app, "/livez").0, 200);
    // The existing allocation still refreshes during the drain.
    let r = alice
        .call(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            3,
        )
        .unwrap();
    assert_eq!(r.code(), None);
}

#[test]
fn over_the_bandwidth_limit_redirects_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &BASE.replace("[turn]\n", "[turn]\nredirect_above_bytes_per_sec = 2000\n"),
    );
    let peer = peer();
    let mut alice = TurnClient::new(app.stun, b"alice", b"alice-pass", REALM);
    alice.allocate_relayed();
    bind_channel(&mut alice, peer.local_addr().unwrap());
    // About 20 kB/s for up to 4 s, until /readyz says so.
    let frame = {
        let mut f = vec![0x40, 0x00, 0, 200];
        f.extend_from_slice(&[7u8; 200]);
        f
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let mut over = false;
    while std::time::Instant::now() < deadline && !over {
        for _ in 0..10 {
            alice.sock.send_to(&frame, app.stun).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let (status, body) = get(&app, "/readyz");
        over = status == 503 && body.contains("over the bandwidth limit");
    }
    assert!(over, "never over the bandwidth limit");
    let mut bob = TurnClient::new(app.stun, b"bob", b"bob-password", REALM);
    assert_eq!(bob.allocate(3).unwrap().code(), Some(300));
    // Quiet again: ready within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(&app, "/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "still not ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(bob.allocate(3).unwrap().code(), None);
}
