//! Crash safety of the key store (checklist K8): a child process generates keys in a loop and
//! prints each key id once its commit returned; it is SIGKILLed at random points, repeatedly.
//! Every acknowledged key must then be present and decrypt, and the database must pass
//! `PRAGMA integrity_check`.
//!
//! The child is this test binary itself, re-executed to run the ignored
//! `crash_child_generate_loop` test with the database path in an environment variable.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use actrix_control::crypto::Kek;
use actrix_control::KeyStore;
use rand::Rng;

const CHILD_ENV: &str = "ACTRIX_CONTROL_CRASH_CHILD_DB";
const KEK: [u8; 32] = [0x5a; 32];

#[test]
#[ignore = "child process of ks_survives_repeated_sigkill"]
fn crash_child_generate_loop() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = KeyStore::open(Path::new(&path), Some(&Kek::from_bytes(KEK)), 3600, 3600)
        .expect("open store");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        let rec = store.generate(1_767_225_600).expect("generate");
        // Acknowledge only after the commit returned.
        writeln!(out, "ACK {}", rec.key_id).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn ks_survives_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ks.db");
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u32> = Vec::new();
    let mut rng = rand::thread_rng();
    for round in 0..30 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_generate_loop",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("ACK ").and_then(|v| v.parse::<u32>().ok()))
                .collect::<Vec<u32>>()
        });
        let wait = if round == 0 {
            300
        } else {
            rng.gen_range(20..200)
        };
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        acked.extend(reader.join().unwrap());
    }
    assert!(!acked.is_empty(), "the child never acknowledged a key");

    let store = KeyStore::open(&db, Some(&Kek::from_bytes(KEK)), 3600, 3600).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    for id in &acked {
        let rec = store
            .get_secret(1_767_225_600, *id)
            .unwrap_or_else(|e| panic!("acknowledged key {id}: {e}"));
        assert!(actrix_control::crypto::public_from_secret(&rec.secret_key[..]).is_ok());
    }
    // No half-written row: every stored row decrypts.
    let count = store.key_count().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ids: Vec<u32> = conn
        .prepare("SELECT key_id FROM ks_keys")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids.len() as u32, count);
    for id in ids {
        assert!(store.get_secret(1_767_225_600, id).is_ok(), "row {id}");
    }
    eprintln!(
        "{} keys acknowledged over 30 kills, {count} stored",
        acked.len()
    );
}

const SIGNING_CHILD_ENV: &str = "ACTRIX_CONTROL_CRASH_CHILD_SIGNING_DB";
const SIGNED: &[u8] = b"claims signed before the acknowledgement";

#[test]
#[ignore = "child process of signing_keys_survive_repeated_sigkill"]
fn crash_child_rotate_loop() {
    let Ok(path) = std::env::var(SIGNING_CHILD_ENV) else {
        return;
    };
    let keys = actrix_control::ais::signing::SigningKeys::open(
        Path::new(&path),
        &Kek::from_bytes(KEK),
        86_400,
        3600,
        600,
    )
    .expect("open store");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut now = 1_767_225_600;
    loop {
        let k = keys.rotate(now).expect("rotate");
        // A credential signed with the key leaves only after the key's commit returned.
        let sig = keys.sign(k.key_id, SIGNED).expect("sign");
        writeln!(out, "ACK {} {}", k.key_id, hex::encode(sig)).unwrap();
        out.flush().unwrap();
        now += 1;
    }
}

/// The same for the AIS's Ed25519 signing keys (actr 0.4): every key that signed something
/// before a SIGKILL is there afterwards, decrypts under the KEK and verifies that signature.
#[test]
fn signing_keys_survive_repeated_sigkill() {
    use actrix_control::ais::signing::SigningKeys;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ais_signing.db");
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut rng = rand::thread_rng();
    for round in 0..20 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_rotate_loop",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SIGNING_CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| {
                    let mut it = l.strip_prefix("ACK ")?.split(' ');
                    let id = it.next()?.parse::<u32>().ok()?;
                    let sig = hex::decode(it.next()?).ok()?;
                    Some((id, sig))
                })
                .collect::<Vec<_>>()
        });
        let wait = if round == 0 {
            300
        } else {
            rng.gen_range(20..200)
        };
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap();
        child.wait().unwrap();
        acked.extend(reader.join().unwrap());
    }
    assert!(!acked.is_empty(), "the child never acknowledged a key");
    let keys = SigningKeys::open(&db, &Kek::from_bytes(KEK), 86_400, 3600, 600).unwrap();
    assert_eq!(keys.integrity_check().unwrap(), "ok");
    for (id, sig) in &acked {
        keys.verify(1_767_225_600, *id, SIGNED, sig)
            .unwrap_or_else(|e| panic!("acknowledged signing key {id}: {e}"));
    }
    eprintln!(
        "{} signing keys acknowledged over 20 kills, {} stored",
        acked.len(),
        keys.stored_key_ids().unwrap().len()
    );
}
