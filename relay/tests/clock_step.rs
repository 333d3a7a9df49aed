//! Reliability checklist C5 on the running appliance: its wall clock steps an hour forward,
//! two hours back (an hour behind true time), and is corrected, under libfaketime (Debian's
//! `faketime`, installed by scripts/deps.sh), while the monotonic clock runs on. TURN nonces
//! carry wall-clock time: through every step a request with a nonce minted under another
//! clock is refused (438 or 401 with a fresh nonce, never success), the client recovers in
//! one round trip, and the allocation, timed on the monotonic clock, lives through it.

mod common;

use actrix_proto::stun::{attr, method};
use common::{Appliance, Launch, TurnClient};
use std::path::Path;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn step(file: &Path, offset: &str) {
    std::fs::write(file, format!("{offset}\n")).unwrap();
    // libfaketime re-reads the file on each clock read (FAKETIME_NO_CACHE); the shard reads
    // its clock once per wake-up.
    std::thread::sleep(std::time::Duration::from_millis(200));
}

fn refresh(c: &mut TurnClient) -> Option<u16> {
    let (tid, bytes) = c.signed(method::REFRESH, &[], None);
    c.transact(&tid, &bytes, 3)
        .expect("refresh answered")
        .code()
}

/// A refused Refresh: take the fresh nonce of the answer.
fn refused(c: &mut TurnClient, code: u16) {
    let (tid, bytes) = c.signed(method::REFRESH, &[], None);
    let r = c.transact(&tid, &bytes, 3).expect("answered");
    assert_eq!(r.code(), Some(code));
    c.nonce = r.msg().get(attr::NONCE).expect("a fresh nonce").to_vec();
}

#[test]
fn wall_clock_steps_of_an_hour_fail_safe_and_recover() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: scripts/deps.sh installs Debian's faketime"
    );
    let tmp = tempfile::tempdir().unwrap();
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let offset_s = offset.to_string_lossy().into_owned();
    let app = Appliance::launch(
        tmp.path(),
        "[turn]\nidentity_credentials = false\nusers = [{ name = \"alice\", password = \"alice-password\" }]\n",
        Launch {
            env: &[
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME_TIMESTAMP_FILE", &offset_s),
                ("FAKETIME_NO_CACHE", "1"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
            ..Launch::default()
        },
    );
    let mut c = TurnClient::new(app.stun, b"alice", b"alice-password", "actor-rtc.local");
    c.allocate_relayed();
    assert_eq!(refresh(&mut c), None);

    step(&offset, "+3600");
    refused(&mut c, 438);
    assert_eq!(refresh(&mut c), None, "recovered after one round trip");

    step(&offset, "-3600");
    refused(&mut c, 401);
    assert_eq!(refresh(&mut c), None);

    step(&offset, "+0");
    refused(&mut c, 438);
    assert_eq!(refresh(&mut c), None);
}
